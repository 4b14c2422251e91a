//! The email service of the dbps example system.
//!
//! It will own the `emails`, `email_attachments` and `email_assignments` collections in
//! its own MongoDB database, keep a `customer_email_index {email, customer_id}` replica from
//! the customer service's events, and send the notifications the quote saga asks for.
