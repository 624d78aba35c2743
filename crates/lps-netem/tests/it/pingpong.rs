//! Round trips through a relay, for the tests and for `examples/measure.rs` (which takes
//! this file in by its path).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// `clients` connections in parallel, `rounds` ping-pongs of 64 bytes each; the sorted
/// round-trip times in ms.
pub async fn ping_pongs(addr: SocketAddr, clients: usize, rounds: usize) -> Vec<f64> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (ping, mut pong) = ([7u8; 64], [0u8; 64]);
                let mut rtts = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    let start = Instant::now();
                    stream.write_all(&ping).await.unwrap();
                    stream.read_exact(&mut pong).await.unwrap();
                    rtts.push(start.elapsed().as_secs_f64() * 1e3);
                }
                rtts
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_by(f64::total_cmp);
    all
}
