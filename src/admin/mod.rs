//! PLACEHOLDER until h-admin merges (not committed).
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
pub fn write_addr_file(data_dir: &Path, addr: SocketAddr) -> std::io::Result<()> {
    std::fs::write(data_dir.join("admin.addr"), format!("{addr}\n"))
}
pub async fn serve_admin(
    _l: tokio::net::TcpListener,
    _n: Arc<dyn crate::node::NodeControl>,
    s: tokio_util::sync::CancellationToken,
) -> Result<(), std::io::Error> {
    s.cancelled().await;
    Ok(())
}
