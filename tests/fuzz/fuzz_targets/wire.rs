//! The wire decoder: any bytes, as any message a peer or a client can send or answer, and as
//! a stored event (dead letters, the log). Decoding may fail, never panic or allocate without
//! bound; an event that decodes re-encodes to one that decodes to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use weft::wire::{self, proto};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = proto::SendFrame::decode(data)
        && let Some(proto::send_frame::Body::Batch(batch)) = frame.body
    {
        for event in batch.events {
            round_trip(event);
        }
    }
    if let Ok(frame) = proto::ReceiveFrame::decode(data) {
        match frame.body {
            Some(proto::receive_frame::Body::Ack(ack)) => {
                let _ = wire::frontiers_from_proto(ack.frontiers);
                let _ = wire::reports_from_proto(ack.reports);
            }
            Some(proto::receive_frame::Body::Heartbeat(beat)) => {
                let _ = wire::reports_from_proto(beat.reports);
            }
            _ => {}
        }
    }
    let _ = proto::SnapshotChunk::decode(data);
    let _ = proto::SnapshotRequest::decode(data);
    let _ = proto::AuditRequest::decode(data);
    if let Ok(reply) = proto::AuditReply::decode(data) {
        for row in reply.rows {
            let _ = wire::audit_row_from_proto(row);
        }
    }
    if let Ok(event) = proto::Event::decode(data) {
        round_trip(event);
    }
});

/// A decoded event survives encoding and decoding unchanged (what the log and dead letters
/// rely on).
fn round_trip(event: proto::Event) {
    let Ok(decoded) = wire::event_from_proto(event) else {
        return;
    };
    let again = wire::decode_event(&wire::encode_event(&decoded)).expect("a re-encoded event decodes");
    assert_eq!(
        wire::encode_event(&again),
        wire::encode_event(&decoded),
        "stable encoding"
    );
}
