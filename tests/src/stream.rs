//! A long-lived raw echo stream through the mesh (the lifecycle and upgrade suites): every
//! exchange sends a distinct 64 KiB pattern that must come back byte for byte.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::Mesh;

/// Bytes per exchange (several TCP segments and HTTP/2 frames).
pub const CHUNK: usize = 64 * 1024;

/// Bound on one exchange.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to a `mesh-echo` server, raw bytes (never an HTTP request line).
pub struct EchoStream {
    tcp: TcpStream,
    /// Bytes sent and received back intact so far.
    pub echoed: u64,
}

impl EchoStream {
    pub fn open(mesh: &Mesh, pod: &str, to: SocketAddr) -> Result<Self> {
        let tcp = mesh.connect(pod, to)?;
        tcp.set_read_timeout(Some(ECHO_TIMEOUT))?;
        tcp.set_write_timeout(Some(ECHO_TIMEOUT))?;
        Ok(EchoStream { tcp, echoed: 0 })
    }

    /// Sends round `round`'s pattern and checks that exactly it comes back.
    pub fn exchange(&mut self, round: u32) -> Result<()> {
        let msg: Vec<u8> = (0..CHUNK)
            .map(|i| (i as u32).wrapping_mul(31).wrapping_add(round * 7) as u8 | 0x80)
            .collect();
        let mut back = vec![0u8; msg.len()];
        // Written from another thread: 64 KiB may not fit the socket buffers while the echo
        // is not read.
        let mut writer = self.tcp.try_clone().context("clone the stream")?;
        let sent = msg.clone();
        let write = std::thread::spawn(move || writer.write_all(&sent));
        let read = self.tcp.read_exact(&mut back);
        let wrote = write
            .join()
            .map_err(|_| anyhow::anyhow!("writer thread panicked"))?;
        wrote.with_context(|| format!("write round {round}"))?;
        read.with_context(|| format!("read round {round}"))?;
        ensure!(back == msg, "round {round}: the echo differs");
        self.echoed += CHUNK as u64;
        Ok(())
    }

    /// Ends the stream normally: FIN from the client, then the server's FIN with nothing
    /// more before it.
    pub fn finish(mut self) -> Result<()> {
        self.tcp
            .shutdown(Shutdown::Write)
            .context("shut down writing")?;
        let mut rest = Vec::new();
        self.tcp
            .read_to_end(&mut rest)
            .context("read to the server's end")?;
        ensure!(
            rest.is_empty(),
            "{} unexpected bytes at the end",
            rest.len()
        );
        Ok(())
    }
}
