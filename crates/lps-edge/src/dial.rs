//! Outbound TCP connections by name, through one shared DNS cache.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use lps_common::dns::{CacheResolver, DnsCache, HickoryLookup};
use tokio::net::TcpStream;

/// Connects to `host:port` names; built once, shared by the bridge and the proxy.
#[derive(Clone)]
pub struct Dialer {
    dns: Arc<DnsCache>,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// No answer within the timeout (resolving included).
    #[error("no connection to {0} within {1:?}")]
    Timeout(String, Duration),
    /// The name did not resolve, or every address refused.
    #[error("cannot connect to {0}: {1}")]
    Failed(String, io::Error),
}

impl Dialer {
    /// A dialer with the system resolver configuration.
    pub fn from_system() -> io::Result<Self> {
        Ok(Self {
            dns: DnsCache::new(Arc::new(HickoryLookup::from_system()?), true),
        })
    }

    /// Connects to `host:port` (a name or an IP literal), trying each address in turn,
    /// all within `timeout`. The socket has `TCP_NODELAY`: MQTT acknowledgements and
    /// request heads are small, and Nagle's algorithm would hold them back.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, DialError> {
        let target = || format!("{host}:{port}");
        let attempt = async {
            let addrs = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => self.dns.resolve(host).await?,
            };
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for ip in addrs {
                match TcpStream::connect(SocketAddr::new(ip, port)).await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(stream);
                    }
                    Err(e) => last = e,
                }
            }
            // The cached addresses may be stale (a restarted container): look again next time.
            self.dns.invalidate(host);
            Err(last)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(DialError::Failed(target(), e)),
            Err(_) => Err(DialError::Timeout(target(), timeout)),
        }
    }

    /// hyper-util's resolver interface over the same cache, for the forwarding client.
    pub fn resolver(&self) -> Resolver {
        CacheResolver::without_timeout(self.dns.clone())
    }
}

/// [`Dialer`]'s cache as a hyper-util resolver (new connections only; IP literals never
/// get here), with no timeout of its own.
pub type Resolver = CacheResolver;
