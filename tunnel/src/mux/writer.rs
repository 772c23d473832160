//! The single tunnel writer: drains the three QoS lanes into large writes.

use std::sync::Arc;
use std::time::Duration;

use remoteingress_wire::qos::{Lane, Scheduler};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::batch::WriteBatch;
use super::reader::RELEASE_IDLE_BUFFERS;
use super::shared::{Lanes, Outgoing, Shared};
use crate::clock::now;
use crate::error::{CloseReason, ProtocolViolation};
use crate::lifecycle::{SessionCore, TaskEnd};

/// Bytes gathered before one write to the TLS stream.
const WRITE_BATCH: usize = 256 * 1024;
/// Time allowed for a clean TLS close when the session ends.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Runs the writer until the session ends, then closes the connection cleanly (TLS
/// close_notify) so the peer sees an orderly end rather than a broken connection.
pub(crate) async fn write_task<W: AsyncWrite>(io: W, lanes: Lanes, shared: Arc<Shared>) {
    tokio::pin!(io);
    let ended = tokio::select! {
        ended = write_loop(&mut io, lanes, &shared) => Some(ended),
        () = shared.lifecycle.closed() => None,
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, io.shutdown()).await;
    match ended {
        Some(Err(reason)) => shared.close(reason),
        Some(Ok(never)) => match never {},
        None => {}
    }
}

fn write_failed(error: std::io::Error) -> CloseReason {
    CloseReason::Io(format!("write failed: {error}"))
}

async fn write_loop<W: AsyncWrite>(
    io: &mut std::pin::Pin<&mut W>,
    mut lanes: Lanes,
    shared: &Shared,
) -> TaskEnd {
    let mut scheduler: Scheduler<Outgoing> = Scheduler::new(shared.options.lanes);
    // Grown by the frames written, and given back once the tunnel is quiet.
    let mut batch = WriteBatch::default();
    let mut flushed = Vec::new();
    let queue = |scheduler: &mut Scheduler<Outgoing>, lane: Lane, item: Outgoing| {
        let len = match &item {
            Outgoing::Frame(frame) => frame.payload.len(),
            Outgoing::Flushed(_) => 0,
        };
        scheduler
            .push(lane, item, len)
            .map_err(|_| CloseReason::from(ProtocolViolation::ControlFlood))
    };
    loop {
        if scheduler.is_empty() {
            let (lane, item) = tokio::select! {
                biased;
                Some(item) = lanes.control.recv() => (Lane::Control, item),
                Some(item) = lanes.data.recv() => (Lane::Data, item),
                Some(item) = lanes.sustained.recv() => (Lane::Sustained, item),
                () = tokio::time::sleep(RELEASE_IDLE_BUFFERS), if batch.holds_memory() => {
                    batch = WriteBatch::default();
                    continue;
                }
                else => return Err(CloseReason::Local("the writer's lanes closed".into())),
            };
            queue(&mut scheduler, lane, item)?;
        }
        // Data lanes first, control last: a stream's OPEN is always queued before its DATA.
        for (lane, rx) in [
            (Lane::Data, &mut lanes.data),
            (Lane::Sustained, &mut lanes.sustained),
        ] {
            while !scheduler.is_full(lane) {
                match rx.try_recv() {
                    Ok(item) => queue(&mut scheduler, lane, item)?,
                    Err(_) => break,
                }
            }
        }
        while let Ok(item) = lanes.control.try_recv() {
            queue(&mut scheduler, Lane::Control, item)?;
        }
        let at = now();
        while batch.len() < WRITE_BATCH {
            match scheduler.pop(at) {
                Some((_, Outgoing::Frame(frame))) => batch.push(frame),
                Some((_, Outgoing::Flushed(done))) => flushed.push(done),
                None => break,
            }
        }
        if !batch.is_empty() {
            batch.write_to(io).await.map_err(write_failed)?;
            io.flush().await.map_err(write_failed)?;
        }
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}
