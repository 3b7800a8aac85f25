//! A small, fixed set of threads for short calls into the root device
//! (signing), instead of tokio's blocking pool.
//!
//! Why: at 64 concurrent Sign requests tokio's blocking pool ran up to 64
//! threads, each parked on its condvar between jobs and woken per job;
//! that wake-up traffic and the pool's contended lock were about a fifth
//! of keyseald's CPU in the ECDSA profile (`docs/performance.md`). Here a
//! few threads take queued jobs one after another and sleep only when the
//! queue is empty, and no more threads enter the device at once than it
//! can use. Slow device work (key generation, seconds inside a TPM) stays
//! on tokio's blocking pool so it cannot hold these threads.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tonic::Status;

use super::timed_out;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Most threads, whatever the CPU count (the PKCS#11 session pool keeps 16).
const MAX_THREADS: usize = 16;

/// The device threads; they end when the pool is dropped.
pub struct DevicePool {
    tx: mpsc::Sender<Job>,
}

impl DevicePool {
    /// Two threads per CPU (one in the device while the other hands back
    /// a result), at least 2, at most 16.
    pub fn for_this_machine() -> std::io::Result<DevicePool> {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        DevicePool::new((2 * cpus).clamp(2, MAX_THREADS))
    }

    /// `threads` (at least 1) threads named `device-worker`.
    pub fn new(threads: usize) -> std::io::Result<DevicePool> {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name("device-worker".into())
                .spawn(move || loop {
                    // One thread waits in `recv` holding the lock; the
                    // others wait for the lock. A job is run after the
                    // lock is released.
                    let job = rx.lock().recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => break,
                    }
                })?;
        }
        Ok(DevicePool { tx })
    }

    /// Runs `f` on a device thread with the request's deadline (`limit`
    /// from now) set for the root backend ([`crate::root::with_deadline`]).
    /// A job still queued when its deadline passes is not started.
    pub async fn run<T: Send + 'static>(
        &self,
        limit: Duration,
        f: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let deadline = Instant::now() + limit;
        let (done, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let out = if Instant::now() >= deadline {
                Err(timed_out())
            } else {
                std::panic::catch_unwind(AssertUnwindSafe(|| {
                    crate::root::with_deadline(deadline, f)
                }))
                .unwrap_or_else(|_| Err(Status::internal("request worker failed")))
            };
            // The caller may have given up (timeout); nothing to tell then.
            let _ = done.send(out);
        });
        if self.tx.send(job).is_err() {
            return Err(Status::unavailable("the device workers have stopped"));
        }
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Status::internal("request worker failed")),
            Err(_) => Err(timed_out()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn runs_jobs_and_bounds_how_many_run_at_once() {
        let pool = Arc::new(DevicePool::new(2).unwrap());
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let out: Vec<Result<usize, Status>> = rt().block_on(async {
            let mut tasks = Vec::new();
            for i in 0..16 {
                let (pool, running, most) = (pool.clone(), running.clone(), most.clone());
                tasks.push(tokio::spawn(async move {
                    pool.run(Duration::from_secs(10), move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(5));
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok(i * 10)
                    })
                    .await
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        let got: Vec<usize> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(got, (0..16).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 2, "two threads, two at once");
    }

    #[test]
    fn a_job_past_its_deadline_is_not_started_and_a_panic_is_an_error() {
        let pool = DevicePool::new(1).unwrap();
        let started = Arc::new(AtomicUsize::new(0));
        rt().block_on(async {
            // Hold the only thread, so the next job waits in the queue.
            let slow = pool.run(Duration::from_secs(10), || {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            });
            let s = started.clone();
            let late = pool.run(Duration::from_millis(50), move || {
                s.fetch_add(1, Ordering::SeqCst);
                Ok(())
            });
            let (slow, late) = tokio::join!(slow, late);
            slow.unwrap();
            assert_eq!(late.unwrap_err().code(), tonic::Code::DeadlineExceeded);
            let e = pool
                .run::<()>(Duration::from_secs(10), || panic!("boom"))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Internal);
            assert!(!e.message().contains("boom"));
            // The thread survived the panic.
            assert_eq!(
                pool.run(Duration::from_secs(10), || Ok(7)).await.unwrap(),
                7
            );
        });
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(started.load(Ordering::SeqCst), 0, "the late job never ran");
    }
}
