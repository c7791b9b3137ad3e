//! Response bodies cut into DATA frames that HTTP/2 sends in one write.
//!
//! h2 copies a DATA frame into its write buffer only when the payload is
//! under 256 bytes. A larger payload is written from its own buffer, and h2
//! queues no frame behind it until that write is done. A token response
//! (about a kilobyte) therefore took two writes, the message and then its
//! trailers, and shared neither with other responses. Cut into small
//! frames, a short response and its trailers are copied into the buffer,
//! and the responses of concurrent calls leave in one write.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use tonic::codegen::Bytes;

/// The largest payload h2 copies into its write buffer.
const COPIED_FRAME: usize = 255;
/// Larger messages keep their single frame, because for them the second
/// write is a small part of the cost and many small frames would not be.
const MAX_CUT_MESSAGE: usize = 4096;

/// Wraps a response body so that its short messages are sent as frames h2
/// copies.
pub fn small_frames<B>(response: http::Response<B>) -> http::Response<SmallFrames<B>> {
    response.map(|inner| SmallFrames {
        inner,
        rest: Bytes::new(),
    })
}

pub struct SmallFrames<B> {
    inner: B,
    /// The part of the current message not yet sent.
    rest: Bytes,
}

impl<B> Body for SmallFrames<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if !this.rest.is_empty() {
            let take = this.rest.len().min(COPIED_FRAME);
            return Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(take)))));
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        match frame.into_data() {
            Ok(mut data) if data.len() > COPIED_FRAME && data.len() <= MAX_CUT_MESSAGE => {
                this.rest = data.split_off(COPIED_FRAME);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Err(frame) => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint.set_lower(inner.lower() + rest);
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Frames = Vec<Result<Frame<Bytes>, std::convert::Infallible>>;

    async fn sent(frames: Frames) -> Vec<Frame<Bytes>> {
        let inner = StreamBody::new(futures::stream::iter(frames));
        let mut body = small_frames(http::Response::new(inner)).into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            out.push(frame.expect("the test body does not fail"));
        }
        out
    }

    fn trailers() -> Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        map.insert("grpc-status", http::HeaderValue::from_static("0"));
        Frame::trailers(map)
    }

    #[tokio::test]
    async fn short_message_cut_before_trailers() {
        let message: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let frames = sent(vec![
            Ok(Frame::data(Bytes::from(message.clone()))),
            Ok(trailers()),
        ])
        .await;

        let (last, data) = frames.split_last().expect("frames were sent");
        let lengths: Vec<usize> = data
            .iter()
            .map(|f| f.data_ref().expect("data frame").len())
            .collect();
        assert_eq!(lengths, [255, 255, 255, 235]);
        let joined: Vec<u8> = data
            .iter()
            .flat_map(|f| f.data_ref().expect("data frame").to_vec())
            .collect();
        assert_eq!(joined, message);
        assert_eq!(
            last.trailers_ref().expect("trailers come last")["grpc-status"],
            "0"
        );
    }

    #[tokio::test]
    async fn end_of_stream_after_last_piece() {
        let inner = http_body_util::Full::new(Bytes::from(vec![1; 600]));
        let mut body = small_frames(http::Response::new(inner)).into_body();
        for expected in [255, 255, 90] {
            assert!(!body.is_end_stream());
            let frame = body.frame().await.expect("a frame").expect("no error");
            assert_eq!(frame.data_ref().expect("data frame").len(), expected);
        }
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn small_and_large_messages_uncut() {
        let small = Bytes::from_static(&[7; COPIED_FRAME]);
        let large = Bytes::from(vec![9; MAX_CUT_MESSAGE + 1]);
        let frames = sent(vec![
            Ok(Frame::data(small.clone())),
            Ok(Frame::data(large.clone())),
        ])
        .await;

        let data: Vec<&Bytes> = frames
            .iter()
            .map(|f| f.data_ref().expect("data frame"))
            .collect();
        assert_eq!(data, [&small, &large]);
    }
}
