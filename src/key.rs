//! Lock keys and the extractors that derive them from a request.
//!
//! A [`LockLayer`](crate::LockLayer) asks its [`MakeLockKey`] for the key of each request.
//! Any closure `Fn(&Parts) -> Option<impl Into<LockKey>>` is one; the ready-made
//! extractors cover the common cases: [`PathKey`] (a named axum path parameter),
//! [`HeaderKey`] and [`QueryKey`]. `None` means "this request has no key": the layer
//! answers 400, or lets the request through unlocked when configured to.

use std::{fmt, sync::Arc};

use http::{HeaderName, request::Parts};

/// The name of one lock, as the application sees it (`"order:42"`).
///
/// Backends add their own namespace around it; the Redis backend, for instance, stores
/// the lock under `<prefix>{<key>}` so that every Redis key belonging to one lock sits in
/// one Cluster hash slot. Cloning is cheap (a reference count).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey(Arc<str>);

impl LockKey {
    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the key is the empty string (which the layer rejects).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `prefix` followed by this key.
    pub(crate) fn prefixed(&self, prefix: &str) -> LockKey {
        if prefix.is_empty() {
            return self.clone();
        }
        let mut joined = String::with_capacity(prefix.len() + self.len());
        joined.push_str(prefix);
        joined.push_str(self.as_str());
        LockKey::from(joined)
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for LockKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<String> for LockKey {
    fn from(key: String) -> Self {
        LockKey(key.into())
    }
}

impl From<&str> for LockKey {
    fn from(key: &str) -> Self {
        LockKey(key.into())
    }
}

impl From<Arc<str>> for LockKey {
    fn from(key: Arc<str>) -> Self {
        LockKey(key)
    }
}

impl From<uuid::Uuid> for LockKey {
    fn from(key: uuid::Uuid) -> Self {
        LockKey::from(key.to_string())
    }
}

macro_rules! lock_key_from_integer {
    ($($int:ty),*) => {
        $(
            impl From<$int> for LockKey {
                fn from(key: $int) -> Self {
                    LockKey::from(key.to_string())
                }
            }
        )*
    };
}

lock_key_from_integer!(u16, u32, u64, u128, usize, i16, i32, i64, i128, isize);

/// Derives the lock key of a request.
///
/// Implemented by every `Fn(&Parts) -> Option<K>` closure where `K: Into<LockKey>`, and by
/// [`PathKey`], [`HeaderKey`] and [`QueryKey`]. The method takes `&mut Parts` so that
/// an implementation can run an axum extractor (which needs `&mut`); closures see `&Parts`.
///
/// # Example
///
/// ```
/// use http::request::Parts;
/// use tower_redis_lock::{InMemoryBackend, LockLayer};
///
/// // Lock per tenant, from a header; requests without one get 400.
/// let layer = LockLayer::new(InMemoryBackend::new(), |parts: &Parts| {
///     parts.headers.get("x-tenant")?.to_str().ok().map(|t| format!("tenant:{t}"))
/// });
/// # let _ = layer;
/// ```
pub trait MakeLockKey: Clone + Send + Sync + 'static {
    /// The key for this request, or `None` when it has none.
    fn make_lock_key(&self, parts: &mut Parts) -> Option<LockKey>;
}

impl<F, K> MakeLockKey for F
where
    F: Fn(&Parts) -> Option<K> + Clone + Send + Sync + 'static,
    K: Into<LockKey>,
{
    fn make_lock_key(&self, parts: &mut Parts) -> Option<LockKey> {
        self(parts).map(Into::into)
    }
}

/// Keys a request by the value of one of its headers.
///
/// A header that is absent, empty, or not visible ASCII gives no key.
#[derive(Clone, Debug)]
pub struct HeaderKey {
    name: HeaderName,
}

impl HeaderKey {
    /// Keys by the header `name`.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

impl MakeLockKey for HeaderKey {
    fn make_lock_key(&self, parts: &mut Parts) -> Option<LockKey> {
        let value = parts.headers.get(&self.name)?.to_str().ok()?;
        (!value.is_empty()).then(|| LockKey::from(value))
    }
}

/// Keys a request by a query-string parameter (`?order=42`), percent-decoded.
///
/// The first occurrence wins; an absent or empty parameter gives no key.
#[derive(Clone, Debug)]
pub struct QueryKey {
    name: Arc<str>,
}

impl QueryKey {
    /// Keys by the query parameter `name`.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self { name: name.into() }
    }
}

impl MakeLockKey for QueryKey {
    fn make_lock_key(&self, parts: &mut Parts) -> Option<LockKey> {
        let query = parts.uri.query()?;
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| *name == *self.name)
            .filter(|(_, value)| !value.is_empty())
            .map(|(_, value)| LockKey::from(value.into_owned()))
    }
}

#[cfg(feature = "axum")]
pub use self::path::PathKey;

#[cfg(feature = "axum")]
mod path {
    use std::{
        future::Future,
        pin::pin,
        sync::Arc,
        task::{Context, Poll, Waker},
    };

    use axum::extract::{FromRequestParts, RawPathParams};
    use http::request::Parts;

    use super::{LockKey, MakeLockKey};

    /// Keys a request by a named axum path parameter: `PathKey::new("order_id")` on a
    /// route `/orders/{order_id}/pay`.
    ///
    /// Path parameters exist once the router has matched a route, so the layer must sit
    /// on the route: `Router::layer`, `Router::route_layer` or `MethodRouter::layer`.
    /// Wrapped around a whole `Router` from the outside it finds no parameter, and the
    /// request gets the layer's "no key" answer.
    ///
    /// # Example
    ///
    /// ```
    /// use axum::{Router, routing::post};
    /// use tower_redis_lock::{InMemoryBackend, LockLayer, PathKey};
    ///
    /// let app: Router = Router::new()
    ///     .route("/orders/{order_id}/pay", post(|| async { "paid" }))
    ///     .route_layer(LockLayer::new(InMemoryBackend::new(), PathKey::new("order_id")));
    /// ```
    #[derive(Clone, Debug)]
    pub struct PathKey {
        name: Arc<str>,
    }

    impl PathKey {
        /// Keys by the path parameter `name` (without braces).
        pub fn new(name: impl Into<Arc<str>>) -> Self {
            Self { name: name.into() }
        }
    }

    impl MakeLockKey for PathKey {
        fn make_lock_key(&self, parts: &mut Parts) -> Option<LockKey> {
            // `RawPathParams` only reads an extension the router left behind; its future
            // never pends, so one poll is the whole extraction.
            let extraction = pin!(RawPathParams::from_request_parts(parts, &()));
            let Poll::Ready(Ok(params)) = extraction.poll(&mut Context::from_waker(Waker::noop()))
            else {
                return None;
            };
            params
                .iter()
                .find(|(name, _)| **name == *self.name)
                .filter(|(_, value)| !value.is_empty())
                .map(|(_, value)| LockKey::from(value))
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn parts(uri: &str, header: Option<&str>) -> Parts {
        let mut builder = Request::builder().uri(uri);
        if let Some(value) = header {
            builder = builder.header("x-key", value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn header_key_reads_the_named_header() {
        let key = HeaderKey::new(HeaderName::from_static("x-key"));
        assert_eq!(
            key.make_lock_key(&mut parts("/", Some("abc"))),
            Some("abc".into())
        );
        assert_eq!(key.make_lock_key(&mut parts("/", Some(""))), None);
        assert_eq!(key.make_lock_key(&mut parts("/", None)), None);
    }

    #[test]
    fn query_param_is_percent_decoded_and_first_wins() {
        let key = QueryKey::new("id");
        assert_eq!(
            key.make_lock_key(&mut parts("/x?a=1&id=a%20b&id=2", None)),
            Some("a b".into())
        );
        assert_eq!(key.make_lock_key(&mut parts("/x?id=", None)), None);
        assert_eq!(key.make_lock_key(&mut parts("/x?other=1", None)), None);
        assert_eq!(key.make_lock_key(&mut parts("/x", None)), None);
    }

    #[test]
    fn closures_are_key_makers() {
        let key = |parts: &Parts| parts.uri.path().strip_prefix("/orders/").map(str::to_owned);
        assert_eq!(
            key.make_lock_key(&mut parts("/orders/7", None)),
            Some("7".into())
        );
        assert_eq!(key.make_lock_key(&mut parts("/other", None)), None);
    }

    #[test]
    fn prefixing_keeps_keys_apart() {
        let key = LockKey::from(42u64);
        assert_eq!(key.prefixed("pay:").as_str(), "pay:42");
        assert_eq!(key.prefixed("").as_str(), "42");
    }
}
