use bytes::Bytes;
use dpuctl::wire::link::{dial, serve, LinkOptions, RemoteError, Service};
use dpuctl::wire::{Addr, Auth, Hello, Psk, Role};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Instant;
struct Echo;
impl Service for Echo {
    fn call(&self, _op: u16, p: Bytes) -> BoxFuture<'static, Result<Bytes, RemoteError>> {
        Box::pin(async move { Ok(p) })
    }
}
fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let auth = Auth::Psk(Arc::new(Psk::generate()));
        let addr: Addr = "tcp://127.0.0.1:0".parse().unwrap();
        let l = addr.bind().await.unwrap();
        let a = l.local_addr();
        let tok = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve(
            l,
            auth.clone(),
            Hello::new(Role::Engine),
            Arc::new(Echo),
            LinkOptions::default(),
            Arc::new(|_| {}),
            Arc::new(|_, _| {}),
            tok.clone(),
        ));
        let link = dial(
            &a,
            &auth,
            &Hello::new(Role::Mount),
            Arc::new(dpuctl::wire::link::NoService),
            LinkOptions::default(),
        )
        .await
        .unwrap();
        let p = Bytes::from(vec![0u8; 64]);
        for _ in 0..2000 {
            link.call(1, p.clone()).await.unwrap();
        }
        let n = 20000u32;
        let t = Instant::now();
        for _ in 0..n {
            link.call(1, p.clone()).await.unwrap();
        }
        println!("link call rtt {:?} (workers {threads})", t.elapsed() / n);
    });
}
