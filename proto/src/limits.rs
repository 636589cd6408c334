//! Size and count limits of the wire contract, shared by servers (which enforce them) and
//! clients (which stay under them).

/// Largest API request or response, in bytes. A job spec is a few hundred bytes and a page of
/// 1,000 job statuses about 1 MiB; anything bigger is a mistake or an attack.
pub const API_MESSAGE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest raft batch between coordinators, in bytes: big enough for a snapshot of a state with
/// 100k jobs, small enough that a hostile peer cannot exhaust memory.
pub const RAFT_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Jobs in one `ListJobs` page at most; the default page when the client asks for 0.
pub const LIST_JOBS_LIMIT_MAX: u32 = 1_000;
pub const LIST_JOBS_LIMIT_DEFAULT: u32 = 100;
/// Length of a client request id at most (a UUID is 36).
pub const CLIENT_REQUEST_ID_LEN_MAX: usize = 128;
/// Length of a bearer token at most.
pub const TOKEN_LEN_MAX: usize = 256;
