//! Sagas: distributed transactions across services that each own their database.
//!
//! `dbps-saga` will provide a `SagaOrchestrator` that runs saga definitions (steps, each
//! with a command and a compensation) with state persisted in the orchestrating service's
//! own database, commands and replies carried by the outbox and the inbox, timeouts, and
//! compensations run in reverse order and retried until they succeed, so that every saga
//! ends completed or fully compensated, also across crashes.
