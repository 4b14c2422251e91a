//! librdkafka's ACL and SCRAM admin calls, which the rdkafka crate does not wrap.
//!
//! This is the only `unsafe` code of the workspace (see
//! `docs/adr/0016-service-boundaries-on-shared-servers.md`). Every pointer librdkafka
//! hands out is owned by a guard that frees it, each call's result is read before its
//! event is destroyed, and strings are copied out before that. The calls run on a
//! blocking thread: they wait on their own result queue.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char};
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use super::{AclBinding, AclOperation, PatternType, ResourceType};

/// What a failed admin call reports: the Kafka error code (if any) and its message.
#[derive(Debug)]
pub(super) struct CallError {
    pub(super) code: Option<RDKafkaErrorCode>,
    pub(super) message: String,
}

impl CallError {
    fn new(code: Option<RDKafkaErrorCode>, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

type CallResult<T> = Result<T, CallError>;

/// An admin client and a deadline for each request.
pub(super) struct Admin {
    client: AdminClient<DefaultClientContext>,
    timeout: Duration,
}

struct Queue(*mut rd::rd_kafka_queue_t);
impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_queue_new and destroyed once, here.
        unsafe { rd::rd_kafka_queue_destroy(self.0) }
    }
}

struct Options(*mut rd::rd_kafka_AdminOptions_t);
impl Drop for Options {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_AdminOptions_new and destroyed once, here.
        unsafe { rd::rd_kafka_AdminOptions_destroy(self.0) }
    }
}

struct Event(*mut rd::rd_kafka_event_t);
impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: returned by rd_kafka_queue_poll (non-null) and destroyed once, here.
        unsafe { rd::rd_kafka_event_destroy(self.0) }
    }
}

/// ACL bindings or filters owned by us until librdkafka has copied them.
struct Bindings(Vec<*mut rd::rd_kafka_AclBinding_t>);
impl Drop for Bindings {
    fn drop(&mut self) {
        for binding in self.0.drain(..) {
            // SAFETY: created by rd_kafka_AclBinding(Filter)_new; the admin calls copy
            // their arguments, so ours are ours to free.
            unsafe { rd::rd_kafka_AclBinding_destroy(binding) }
        }
    }
}

struct Alterations(Vec<*mut rd::rd_kafka_UserScramCredentialAlteration_t>);
impl Drop for Alterations {
    fn drop(&mut self) {
        for alteration in self.0.drain(..) {
            // SAFETY: created by rd_kafka_UserScramCredential*_new, copied by the call.
            unsafe { rd::rd_kafka_UserScramCredentialAlteration_destroy(alteration) }
        }
    }
}

fn c_string(what: &str, value: &str) -> CallResult<CString> {
    CString::new(value).map_err(|_| CallError::new(None, format!("{what} contains a nul character")))
}

/// Copies a C string librdkafka owns (null reads as empty).
fn owned(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: librdkafka returns nul-terminated strings that live as long as their
    // result object, which outlives this copy.
    unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
}

/// The code and message of an `rd_kafka_error_t`, if it is an error.
fn error_of(error: *const rd::rd_kafka_error_t) -> Option<CallError> {
    if error.is_null() {
        return None;
    }
    // SAFETY: a non-null error object belonging to a live result.
    let (code, message) = unsafe { (rd::rd_kafka_error_code(error), rd::rd_kafka_error_string(error)) };
    let code = RDKafkaErrorCode::from(code);
    (code != RDKafkaErrorCode::NoError).then(|| CallError::new(Some(code), owned(message)))
}

fn errstr_text(buffer: &[c_char]) -> String {
    // SAFETY: librdkafka writes a nul-terminated message into the buffer it was given
    // (zero-filled beforehand, so it is terminated even when nothing was written).
    unsafe { CStr::from_ptr(buffer.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

impl Admin {
    pub(super) fn new(client: AdminClient<DefaultClientContext>, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    fn rk(&self) -> *mut rd::rd_kafka_t {
        self.client.inner().native_ptr()
    }

    fn timeout_ms(&self) -> i32 {
        i32::try_from(self.timeout.as_millis()).unwrap_or(i32::MAX)
    }

    fn options(&self, op: rd::rd_kafka_admin_op_t) -> CallResult<Options> {
        // SAFETY: rk is the live client this admin owns.
        let options = Options(unsafe { rd::rd_kafka_AdminOptions_new(self.rk(), op) });
        if options.0.is_null() {
            return Err(CallError::new(None, "librdkafka refused admin options"));
        }
        let mut errstr = [0 as c_char; 512];
        // SAFETY: options is live; errstr is a writable buffer of the size given.
        let code = unsafe {
            rd::rd_kafka_AdminOptions_set_request_timeout(
                options.0,
                self.timeout_ms(),
                errstr.as_mut_ptr(),
                errstr.len(),
            )
        };
        if RDKafkaErrorCode::from(code) != RDKafkaErrorCode::NoError {
            return Err(CallError::new(Some(RDKafkaErrorCode::from(code)), errstr_text(&errstr)));
        }
        Ok(options)
    }

    fn queue(&self) -> Queue {
        // SAFETY: rk is live; the queue is destroyed before the client (it is a local).
        Queue(unsafe { rd::rd_kafka_queue_new(self.rk()) })
    }

    /// Waits for the call's result on `queue`, a little longer than the request timeout.
    fn wait(&self, queue: &Queue, what: &str) -> CallResult<Event> {
        let wait = self.timeout_ms().saturating_add(5_000);
        // SAFETY: the queue is live.
        let event = unsafe { rd::rd_kafka_queue_poll(queue.0, wait) };
        if event.is_null() {
            return Err(CallError::new(
                Some(RDKafkaErrorCode::OperationTimedOut),
                format!("{what}: no answer within {wait} ms"),
            ));
        }
        let event = Event(event);
        // SAFETY: the event is live.
        let code = RDKafkaErrorCode::from(unsafe { rd::rd_kafka_event_error(event.0) });
        if code != RDKafkaErrorCode::NoError {
            // SAFETY: as above; the string lives as long as the event.
            let message = owned(unsafe { rd::rd_kafka_event_error_string(event.0) });
            return Err(CallError::new(Some(code), format!("{what}: {message}")));
        }
        Ok(event)
    }

    fn binding(binding: &AclBinding, filter: bool) -> CallResult<*mut rd::rd_kafka_AclBinding_t> {
        let name = c_string("resource name", &binding.name)?;
        let principal = c_string("principal", &binding.principal)?;
        let host = c_string("host", &binding.host)?;
        let mut errstr = [0 as c_char; 512];
        let permission = rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ALLOW;
        // Same arguments, same types (a filter is a binding whose fields may be "any").
        let new = if filter {
            rd::rd_kafka_AclBindingFilter_new
        } else {
            rd::rd_kafka_AclBinding_new
        };
        // SAFETY: the strings outlive the call (librdkafka copies them); errstr is a
        // writable buffer of the size given.
        let created = unsafe {
            new(
                binding.resource.raw(),
                name.as_ptr(),
                binding.pattern.raw(),
                principal.as_ptr(),
                host.as_ptr(),
                binding.operation.raw(),
                permission,
                errstr.as_mut_ptr(),
                errstr.len(),
            )
        };
        if created.is_null() {
            return Err(CallError::new(
                None,
                format!("invalid ACL {binding}: {}", errstr_text(&errstr)),
            ));
        }
        Ok(created)
    }

    /// Creates the bindings (an existing one is left as it is).
    pub(super) fn create_acls(&self, bindings: &[AclBinding]) -> CallResult<()> {
        if bindings.is_empty() {
            return Ok(());
        }
        let mut owned_bindings = Bindings(Vec::with_capacity(bindings.len()));
        for binding in bindings {
            owned_bindings.0.push(Self::binding(binding, false)?);
        }
        let options = self.options(rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_CREATEACLS)?;
        let queue = self.queue();
        // SAFETY: all pointers are live; librdkafka copies the bindings.
        unsafe {
            rd::rd_kafka_CreateAcls(
                self.rk(),
                owned_bindings.0.as_mut_ptr(),
                owned_bindings.0.len(),
                options.0,
                queue.0,
            );
        }
        let event = self.wait(&queue, "create ACLs")?;
        // SAFETY: the event is live and is a CreateAcls result.
        let result = unsafe { rd::rd_kafka_event_CreateAcls_result(event.0) };
        if result.is_null() {
            return Err(CallError::new(None, "create ACLs: unexpected result type"));
        }
        let mut count = 0;
        // SAFETY: result is live; the array holds `count` entries owned by the event.
        let results = unsafe { rd::rd_kafka_CreateAcls_result_acls(result, &mut count) };
        for index in 0..count {
            // SAFETY: index < count.
            let entry = unsafe { *results.add(index) };
            // SAFETY: entry is live while the event is.
            if let Some(error) = error_of(unsafe { rd::rd_kafka_acl_result_error(entry) }) {
                let binding = bindings.get(index).map_or_else(String::new, ToString::to_string);
                return Err(CallError::new(
                    error.code,
                    format!("create ACL {binding}: {}", error.message),
                ));
            }
        }
        Ok(())
    }

    /// The bindings of `principal` (every resource, operation and host).
    pub(super) fn describe_acls(&self, principal: &str) -> CallResult<Vec<AclBinding>> {
        let filter = Bindings(vec![Self::principal_filter(principal)?]);
        let options = self.options(rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBEACLS)?;
        let queue = self.queue();
        // SAFETY: all pointers are live; librdkafka copies the filter.
        unsafe { rd::rd_kafka_DescribeAcls(self.rk(), filter.0[0], options.0, queue.0) };
        let event = self.wait(&queue, "describe ACLs")?;
        // SAFETY: the event is live and is a DescribeAcls result.
        let result = unsafe { rd::rd_kafka_event_DescribeAcls_result(event.0) };
        if result.is_null() {
            return Err(CallError::new(None, "describe ACLs: unexpected result type"));
        }
        let mut count = 0;
        // SAFETY: result is live; the array holds `count` bindings owned by the event.
        let acls = unsafe { rd::rd_kafka_DescribeAcls_result_acls(result, &mut count) };
        let mut found = Vec::with_capacity(count);
        for index in 0..count {
            // SAFETY: index < count; the binding lives as long as the event.
            let acl = unsafe { *acls.add(index) };
            if let Some(binding) = Self::read_binding(acl) {
                found.push(binding);
            }
        }
        Ok(found)
    }

    /// Reads a binding librdkafka returned; `None` for kinds dbps never grants.
    fn read_binding(acl: *const rd::rd_kafka_AclBinding_t) -> Option<AclBinding> {
        // SAFETY: acl is a live binding of a live event; strings are copied out.
        unsafe {
            let permission = rd::rd_kafka_AclBinding_permission_type(acl);
            if permission != rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ALLOW {
                return None;
            }
            Some(AclBinding {
                resource: ResourceType::from_raw(rd::rd_kafka_AclBinding_restype(acl))?,
                pattern: PatternType::from_raw(rd::rd_kafka_AclBinding_resource_pattern_type(acl))?,
                name: owned(rd::rd_kafka_AclBinding_name(acl)),
                operation: AclOperation::from_raw(rd::rd_kafka_AclBinding_operation(acl))?,
                principal: owned(rd::rd_kafka_AclBinding_principal(acl)),
                host: owned(rd::rd_kafka_AclBinding_host(acl)),
            })
        }
    }

    fn principal_filter(principal: &str) -> CallResult<*mut rd::rd_kafka_AclBinding_t> {
        let principal = c_string("principal", principal)?;
        let mut errstr = [0 as c_char; 512];
        // SAFETY: as in `binding`; null name and host match any.
        let filter = unsafe {
            rd::rd_kafka_AclBindingFilter_new(
                rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_ANY,
                std::ptr::null(),
                rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_ANY,
                principal.as_ptr(),
                std::ptr::null(),
                rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_ANY,
                rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ANY,
                errstr.as_mut_ptr(),
                errstr.len(),
            )
        };
        if filter.is_null() {
            return Err(CallError::new(
                None,
                format!("invalid ACL filter: {}", errstr_text(&errstr)),
            ));
        }
        Ok(filter)
    }

    /// Deletes the bindings matching these exact bindings, or every binding of `principal`
    /// when `bindings` is `None`. Returns how many were deleted.
    pub(super) fn delete_acls(&self, principal: &str, bindings: Option<&[AclBinding]>) -> CallResult<usize> {
        let filters = match bindings {
            Some([]) => return Ok(0),
            Some(bindings) => {
                let mut filters = Bindings(Vec::with_capacity(bindings.len()));
                for binding in bindings {
                    filters.0.push(Self::binding(binding, true)?);
                }
                filters
            }
            None => Bindings(vec![Self::principal_filter(principal)?]),
        };
        let mut filters = filters;
        let options = self.options(rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DELETEACLS)?;
        let queue = self.queue();
        // SAFETY: all pointers are live; librdkafka copies the filters.
        unsafe {
            rd::rd_kafka_DeleteAcls(self.rk(), filters.0.as_mut_ptr(), filters.0.len(), options.0, queue.0);
        }
        let event = self.wait(&queue, "delete ACLs")?;
        // SAFETY: the event is live and is a DeleteAcls result.
        let result = unsafe { rd::rd_kafka_event_DeleteAcls_result(event.0) };
        if result.is_null() {
            return Err(CallError::new(None, "delete ACLs: unexpected result type"));
        }
        let mut count = 0;
        // SAFETY: result is live; `count` responses owned by the event.
        let responses = unsafe { rd::rd_kafka_DeleteAcls_result_responses(result, &mut count) };
        let mut deleted = 0;
        for index in 0..count {
            // SAFETY: index < count.
            let response = unsafe { *responses.add(index) };
            // SAFETY: response is live while the event is.
            if let Some(error) = error_of(unsafe { rd::rd_kafka_DeleteAcls_result_response_error(response) }) {
                return Err(CallError::new(error.code, format!("delete ACLs: {}", error.message)));
            }
            let mut matching = 0;
            // SAFETY: as above; only the count is read.
            unsafe { rd::rd_kafka_DeleteAcls_result_response_matching_acls(response, &mut matching) };
            deleted += matching;
        }
        Ok(deleted)
    }

    /// Sets `user`'s SCRAM-SHA-512 credential (created or replaced), or deletes it when
    /// `password` is `None` (a user without one is not an error).
    pub(super) fn alter_scram(&self, user: &str, password: Option<&str>, iterations: i32) -> CallResult<()> {
        let name = c_string("user name", user)?;
        let mechanism = rd::rd_kafka_ScramMechanism_t::RD_KAFKA_SCRAM_MECHANISM_SHA_512;
        // SAFETY: the strings and the password bytes outlive the call (copied); a null
        // salt asks librdkafka for a random one.
        let alteration = unsafe {
            match password {
                Some(password) => rd::rd_kafka_UserScramCredentialUpsertion_new(
                    name.as_ptr(),
                    mechanism,
                    iterations,
                    password.as_ptr(),
                    password.len(),
                    std::ptr::null(),
                    0,
                ),
                None => rd::rd_kafka_UserScramCredentialDeletion_new(name.as_ptr(), mechanism),
            }
        };
        if alteration.is_null() {
            return Err(CallError::new(None, "librdkafka refused the SCRAM credential"));
        }
        let mut alterations = Alterations(vec![alteration]);
        let options = self.options(rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_ALTERUSERSCRAMCREDENTIALS)?;
        let queue = self.queue();
        // SAFETY: all pointers are live; librdkafka copies the alterations.
        unsafe {
            rd::rd_kafka_AlterUserScramCredentials(
                self.rk(),
                alterations.0.as_mut_ptr(),
                alterations.0.len(),
                options.0,
                queue.0,
            );
        }
        let event = self.wait(&queue, "alter SCRAM credentials")?;
        // SAFETY: the event is live and is an AlterUserScramCredentials result.
        let result = unsafe { rd::rd_kafka_event_AlterUserScramCredentials_result(event.0) };
        if result.is_null() {
            return Err(CallError::new(None, "alter SCRAM credentials: unexpected result type"));
        }
        let mut count = 0;
        // SAFETY: result is live; `count` responses owned by the event.
        let responses = unsafe { rd::rd_kafka_AlterUserScramCredentials_result_responses(result, &mut count) };
        for index in 0..count {
            // SAFETY: index < count; the response lives while the event does.
            let response = unsafe { *responses.add(index) };
            // SAFETY: as above.
            let error = error_of(unsafe { rd::rd_kafka_AlterUserScramCredentials_result_response_error(response) });
            match error {
                // Deleting a credential that does not exist: already revoked.
                Some(error) if password.is_none() && error.code == Some(RDKafkaErrorCode::ResourceNotFound) => {}
                Some(error) => {
                    return Err(CallError::new(
                        error.code,
                        format!("alter SCRAM credential of {user}: {}", error.message),
                    ));
                }
                None => {}
            }
        }
        Ok(())
    }
}

impl ResourceType {
    fn raw(self) -> rd::rd_kafka_ResourceType_t {
        match self {
            Self::Topic => rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
            Self::Group => rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_GROUP,
            Self::Cluster => rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_BROKER,
            Self::TransactionalId => rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TRANSACTIONAL_ID,
        }
    }

    fn from_raw(raw: rd::rd_kafka_ResourceType_t) -> Option<Self> {
        use rd::rd_kafka_ResourceType_t as R;
        match raw {
            R::RD_KAFKA_RESOURCE_TOPIC => Some(Self::Topic),
            R::RD_KAFKA_RESOURCE_GROUP => Some(Self::Group),
            R::RD_KAFKA_RESOURCE_BROKER => Some(Self::Cluster),
            R::RD_KAFKA_RESOURCE_TRANSACTIONAL_ID => Some(Self::TransactionalId),
            _ => None,
        }
    }
}

impl PatternType {
    fn raw(self) -> rd::rd_kafka_ResourcePatternType_t {
        match self {
            Self::Literal => rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_LITERAL,
            Self::Prefixed => rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_PREFIXED,
        }
    }

    fn from_raw(raw: rd::rd_kafka_ResourcePatternType_t) -> Option<Self> {
        use rd::rd_kafka_ResourcePatternType_t as P;
        match raw {
            P::RD_KAFKA_RESOURCE_PATTERN_LITERAL => Some(Self::Literal),
            P::RD_KAFKA_RESOURCE_PATTERN_PREFIXED => Some(Self::Prefixed),
            _ => None,
        }
    }
}

impl AclOperation {
    fn raw(self) -> rd::rd_kafka_AclOperation_t {
        use rd::rd_kafka_AclOperation_t as O;
        match self {
            Self::Read => O::RD_KAFKA_ACL_OPERATION_READ,
            Self::Write => O::RD_KAFKA_ACL_OPERATION_WRITE,
            Self::Create => O::RD_KAFKA_ACL_OPERATION_CREATE,
            Self::Delete => O::RD_KAFKA_ACL_OPERATION_DELETE,
            Self::Alter => O::RD_KAFKA_ACL_OPERATION_ALTER,
            Self::Describe => O::RD_KAFKA_ACL_OPERATION_DESCRIBE,
            Self::DescribeConfigs => O::RD_KAFKA_ACL_OPERATION_DESCRIBE_CONFIGS,
            Self::AlterConfigs => O::RD_KAFKA_ACL_OPERATION_ALTER_CONFIGS,
            Self::IdempotentWrite => O::RD_KAFKA_ACL_OPERATION_IDEMPOTENT_WRITE,
            Self::All => O::RD_KAFKA_ACL_OPERATION_ALL,
            Self::ClusterAction => O::RD_KAFKA_ACL_OPERATION_CLUSTER_ACTION,
        }
    }

    fn from_raw(raw: rd::rd_kafka_AclOperation_t) -> Option<Self> {
        use rd::rd_kafka_AclOperation_t as O;
        match raw {
            O::RD_KAFKA_ACL_OPERATION_READ => Some(Self::Read),
            O::RD_KAFKA_ACL_OPERATION_WRITE => Some(Self::Write),
            O::RD_KAFKA_ACL_OPERATION_CREATE => Some(Self::Create),
            O::RD_KAFKA_ACL_OPERATION_DELETE => Some(Self::Delete),
            O::RD_KAFKA_ACL_OPERATION_ALTER => Some(Self::Alter),
            O::RD_KAFKA_ACL_OPERATION_DESCRIBE => Some(Self::Describe),
            O::RD_KAFKA_ACL_OPERATION_DESCRIBE_CONFIGS => Some(Self::DescribeConfigs),
            O::RD_KAFKA_ACL_OPERATION_ALTER_CONFIGS => Some(Self::AlterConfigs),
            O::RD_KAFKA_ACL_OPERATION_IDEMPOTENT_WRITE => Some(Self::IdempotentWrite),
            O::RD_KAFKA_ACL_OPERATION_ALL => Some(Self::All),
            O::RD_KAFKA_ACL_OPERATION_CLUSTER_ACTION => Some(Self::ClusterAction),
            _ => None,
        }
    }
}
