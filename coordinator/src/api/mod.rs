//! gRPC services of the coordinator. Handlers are thin: authenticate, decode with
//! `flotilla_proto::convert`, call the node, map the error with `ApiError`.

pub mod cluster;
pub mod inference;
pub mod jobs;
pub mod raft_service;
pub mod registry;
pub(crate) mod worker_auth;

use flotilla_proto::ApiError;
use tonic::Status;

/// Items in one page of a list at most (and by default).
pub(crate) const PAGE_LIMIT_MAX: usize = 1000;

/// The page size a request asks for: 0 means the default, more than the maximum the maximum.
pub(crate) fn page_limit(limit: u32) -> usize {
    match limit {
        0 => PAGE_LIMIT_MAX,
        n => (n as usize).min(PAGE_LIMIT_MAX),
    }
}

/// One page of `sorted` (ascending by key): the items after `after`, at most `limit`, and the
/// key to continue after when more follow. Keys, not offsets: a record forgotten or added
/// between pages shifts nothing.
pub(crate) fn page<K: Ord + Clone, T>(
    sorted: impl Iterator<Item = (K, T)>,
    after: Option<K>,
    limit: usize,
) -> (Vec<T>, Option<K>) {
    let mut items: Vec<(K, T)> = sorted.filter(|(k, _)| after.as_ref().is_none_or(|a| k > a)).take(limit + 1).collect();
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|(k, _)| k.clone())
    } else {
        None
    };
    (items.into_iter().map(|(_, t)| t).collect(), next)
}

/// The key a page token names (`None`: the first page), for lists keyed by an id.
pub(crate) fn page_after<K: std::str::FromStr>(token: &str) -> Result<Option<K>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token.parse().map(Some).map_err(|_| bad_page_token(token))
}

/// A malformed page token.
pub(crate) fn bad_page_token(token: &str) -> Status {
    status(ApiError::new(
        flotilla_proto::ErrorKind::InvalidArgument,
        format!("page_token `{token}` is not one this list gave out (pass next_page_token as it came)"),
    ))
}

/// Maps any layer's error onto the wire through the one mapping in `flotilla-proto`.
pub(crate) fn status(err: impl Into<ApiError>) -> Status {
    err.into().into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages_continue_after_their_key_and_end_without_a_token() {
        let items = || (1..=5u32).map(|k| (k, k * 10));
        assert_eq!(super::page(items(), None, 2), (vec![10, 20], Some(2)));
        assert_eq!(super::page(items(), Some(2), 2), (vec![30, 40], Some(4)));
        assert_eq!(super::page(items(), Some(4), 2), (vec![50], None));
        assert_eq!(super::page(items(), Some(3), 10), (vec![40, 50], None), "a vanished key still orders");
        assert_eq!(super::page_limit(0), super::PAGE_LIMIT_MAX);
        assert_eq!(super::page_limit(5), 5);
        assert_eq!(super::page_limit(u32::MAX), super::PAGE_LIMIT_MAX);
    }
}
