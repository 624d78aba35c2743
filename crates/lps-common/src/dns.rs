//! A DNS cache for the outbound HTTP clients.
//!
//! Upstream resolved its target once and rewrote the URL to the IP, which broke failover
//! when a restarted container came back with a new address. This cache keeps the URL (and
//! so the `Host` header) as the name, honours the record TTLs, and forgets a name as soon as
//! connecting to one of its addresses fails ([`DnsCache::invalidate`]), so it can stay on in
//! failover runs. With `SKIP_DNS_CACHE` every new connection resolves afresh.
//!
//! The name lookup behind it is a [`NameLookup`]: hickory-resolver in services,
//! [`StaticLookup`] in tests that need to move a name to another address.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use hickory_resolver::TokioResolver;
use hyper_util::client::legacy::connect::dns::Name;
use tracing::debug;

/// The addresses of a name and how long they may be cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Addresses in preference order.
    pub addrs: Vec<IpAddr>,
    /// When the answer expires.
    pub valid_until: Instant,
}

/// Resolves a host name to addresses.
pub trait NameLookup: Send + Sync + 'static {
    /// Looks up `host`.
    fn lookup(&self, host: &str) -> BoxFuture<'static, io::Result<Resolved>>;
}

/// hickory-resolver with the system configuration (`/etc/resolv.conf`, `/etc/hosts`) and its
/// own cache turned off: the [`DnsCache`] above it decides what is cached.
pub struct HickoryLookup {
    resolver: TokioResolver,
}

impl HickoryLookup {
    /// Builds the resolver from the system configuration.
    pub fn from_system() -> io::Result<Self> {
        let mut builder = TokioResolver::builder_tokio().map_err(io::Error::other)?;
        builder.options_mut().cache_size = 0;
        let resolver = builder.build().map_err(io::Error::other)?;
        Ok(Self { resolver })
    }
}

impl NameLookup for HickoryLookup {
    fn lookup(&self, host: &str) -> BoxFuture<'static, io::Result<Resolved>> {
        let resolver = self.resolver.clone();
        let host = host.to_owned();
        Box::pin(async move {
            let answer = resolver.lookup_ip(host.as_str()).await.map_err(|error| {
                io::Error::new(io::ErrorKind::NotFound, format!("resolve {host}: {error}"))
            })?;
            Ok(Resolved {
                addrs: answer.iter().collect(),
                valid_until: answer.valid_until(),
            })
        })
    }
}

/// A fixed table of names, changeable at run time; answers expire after `ttl`.
pub struct StaticLookup {
    table: RwLock<HashMap<String, Vec<IpAddr>>>,
    ttl: Duration,
}

impl StaticLookup {
    /// An empty table whose answers are valid for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            table: RwLock::new(HashMap::new()),
            ttl,
        }
    }

    /// Points `host` at `addrs`.
    pub fn set(&self, host: &str, addrs: Vec<IpAddr>) {
        self.table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(host.to_owned(), addrs);
    }
}

impl NameLookup for StaticLookup {
    fn lookup(&self, host: &str) -> BoxFuture<'static, io::Result<Resolved>> {
        let answer = self
            .table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(host)
            .cloned();
        let ttl = self.ttl;
        let host = host.to_owned();
        Box::pin(async move {
            let addrs = answer.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("unknown host {host}"))
            })?;
            Ok(Resolved {
                addrs,
                valid_until: Instant::now() + ttl,
            })
        })
    }
}

/// A TTL-honouring cache over a [`NameLookup`], the resolver of the outbound client.
pub struct DnsCache {
    lookup: Arc<dyn NameLookup>,
    enabled: bool,
    entries: DashMap<String, Resolved>,
    lookups: AtomicU64,
}

impl DnsCache {
    /// A cache over `lookup`; with `enabled == false` every call resolves afresh.
    pub fn new(lookup: Arc<dyn NameLookup>, enabled: bool) -> Arc<Self> {
        Arc::new(Self {
            lookup,
            enabled,
            entries: DashMap::new(),
            lookups: AtomicU64::new(0),
        })
    }

    /// Resolves `host`, from the cache while the answer is valid.
    pub async fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        if self.enabled
            && let Some(entry) = self.entries.get(host)
            && entry.valid_until > Instant::now()
        {
            return Ok(entry.addrs.clone());
        }
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let resolved = self.lookup.lookup(host).await?;
        if resolved.addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no addresses"),
            ));
        }
        debug!(host, addrs = ?resolved.addrs, "resolved");
        let addrs = resolved.addrs.clone();
        if self.enabled {
            self.entries.insert(host.to_owned(), resolved);
        }
        Ok(addrs)
    }

    /// Forgets `host`, e.g. after connecting to its cached address failed. Returns whether
    /// there was an entry to forget.
    pub fn invalidate(&self, host: &str) -> bool {
        let removed = self.entries.remove(host).is_some();
        if removed {
            debug!(host, "dropped cached address after a failed connect");
        }
        removed
    }

    /// How many lookups went past the cache.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }
}

/// Adapter so hyper-util's `HttpConnector` resolves through a shared [`DnsCache`]. It is
/// called for new connections only, never for a pooled one. IP literals do not get here:
/// the connector uses them as they are.
#[derive(Clone)]
pub struct CacheResolver {
    cache: Arc<DnsCache>,
    /// When set, the lookup gets the connect timeout: hickory's own retries may take far
    /// longer.
    timeout: Option<Duration>,
}

impl CacheResolver {
    /// Resolves through `cache`, giving up after `timeout`.
    pub fn new(cache: Arc<DnsCache>, timeout: Duration) -> Self {
        Self {
            cache,
            timeout: Some(timeout),
        }
    }

    /// Resolves through `cache` with no timeout of its own.
    pub fn without_timeout(cache: Arc<DnsCache>) -> Self {
        Self {
            cache,
            timeout: None,
        }
    }
}

impl tower::Service<Name> for CacheResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let (cache, timeout) = (self.cache.clone(), self.timeout);
        Box::pin(async move {
            let host = name.as_str();
            let addrs = match timeout {
                Some(timeout) => tokio::time::timeout(timeout, cache.resolve(host))
                    .await
                    .map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("resolve {host}: no answer within {timeout:?}"),
                        )
                    })??,
                None => cache.resolve(host).await?,
            };
            // Port 0: the connector puts in the URL's port.
            Ok(addrs
                .into_iter()
                .map(|ip| SocketAddr::new(ip, 0))
                .collect::<Vec<_>>()
                .into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cache_honours_ttl_and_invalidation() {
        let table = Arc::new(StaticLookup::new(Duration::from_millis(200)));
        table.set("backend", vec![IpAddr::from([127, 0, 0, 2])]);
        let cache = DnsCache::new(table.clone(), true);
        assert_eq!(
            cache.resolve("backend").await.unwrap()[0],
            IpAddr::from([127, 0, 0, 2])
        );
        table.set("backend", vec![IpAddr::from([127, 0, 0, 3])]);
        // Cached until the TTL runs out or a connect fails.
        assert_eq!(
            cache.resolve("backend").await.unwrap()[0],
            IpAddr::from([127, 0, 0, 2])
        );
        assert_eq!(cache.lookups(), 1);
        assert!(cache.invalidate("backend"));
        assert_eq!(
            cache.resolve("backend").await.unwrap()[0],
            IpAddr::from([127, 0, 0, 3])
        );
        assert_eq!(cache.lookups(), 2);
        table.set("backend", vec![IpAddr::from([127, 0, 0, 4])]);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            cache.resolve("backend").await.unwrap()[0],
            IpAddr::from([127, 0, 0, 4])
        );
        assert_eq!(cache.lookups(), 3);
    }

    #[tokio::test]
    async fn disabled_cache_resolves_every_time() {
        let table = Arc::new(StaticLookup::new(Duration::from_secs(60)));
        table.set("backend", vec![IpAddr::from([127, 0, 0, 2])]);
        let cache = DnsCache::new(table, false);
        for _ in 0..3 {
            cache.resolve("backend").await.unwrap();
        }
        assert_eq!(cache.lookups(), 3);
        assert!(cache.resolve("nowhere").await.is_err());
    }

    #[tokio::test]
    async fn hickory_resolves_localhost_from_hosts_file() {
        let lookup = HickoryLookup::from_system().unwrap();
        let answer = lookup.lookup("localhost").await.unwrap();
        assert!(answer.addrs.iter().any(IpAddr::is_loopback), "{answer:?}");
    }
}
