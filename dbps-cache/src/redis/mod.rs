//! Redis: cache-aside that cannot serve stale data, rate limiting shared by a service's
//! instances, and sessions that survive restarts.

mod cache;
mod limiter;
mod session;

pub use cache::{Generation, Invalidate, Lookup, RedisCache, RedisCacheBuilder};
pub use limiter::{Decision, Quota, RateLimit, RateLimiter, rate_limit};
pub use session::RedisSessionStore;
