//! The request queue: producers publish `{"v":1,"job":...}` and tasuki accepts a run.
//! A request is acked only after its run and outbox row are committed; a store failure
//! puts it back (after a pause) and the idempotency key (`message_id`) makes the
//! redelivery the same run. A request that cannot become a run is answered with the
//! API's error body (when it has `reply_to`), published into `{queue}.dead` with
//! headers naming the error, and then acked.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::replier::{AmqpReplier, text};
use super::{Brokers, QueueKind, dead_letter_queue, declare_topology, unavailable};
use crate::domain::ports::QueueError;
use crate::domain::reply::{ReplyAddress, Requester};
use crate::domain::store::Replies;
use crate::protocol::api::{ErrorBodyV1, ErrorCodeV1};
use crate::protocol::request::{RequestError, parse_request};
use crate::service::runs::{AcceptError, Accepted, MAX_IDEMPOTENCY_KEY_LEN, ParamLimitError, Runs};

/// How long a request whose run could not be stored waits before it is put back.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);
/// Between attempts to reach the broker.
const RECONNECT_DELAY: Duration = Duration::from_secs(2);

pub struct RequestConsumer {
    /// The broker's nodes, tried in turn.
    pub brokers: Brokers,
    pub queue: String,
    pub kind: QueueKind,
    pub runs: Runs,
    pub replier: Arc<AmqpReplier>,
    /// Where a repeated request's replies are added.
    pub replies: Arc<dyn Replies>,
    /// Wakes the reply relay after an accept (an `accepted` reply may be due).
    pub replies_wake: Arc<Notify>,
    /// Checks a callback URL (the request's, or its job's) before the run is accepted.
    pub callbacks: Arc<dyn crate::domain::callback::CallbackSender>,
}

/// What is done with a request.
enum Verdict {
    Ack,
    /// Not stored now; delivered again later.
    Requeue,
    Refuse(ErrorCodeV1, String),
}

fn short(s: &Option<ShortString>) -> Option<String> {
    s.as_ref()
        .map(|v| v.as_str().to_owned())
        .filter(|v| !v.is_empty())
}

/// The idempotency key from `message_id`: the same rules as the HTTP header.
fn idempotency_key(message_id: Option<String>) -> Result<Option<String>, String> {
    let Some(key) = message_id else {
        return Ok(None);
    };
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "message_id must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
        ));
    }
    Ok(Some(key))
}

fn request_error_code(e: &RequestError) -> ErrorCodeV1 {
    match e {
        RequestError::TooLarge(_) => ErrorCodeV1::BodyTooLarge,
        RequestError::InvalidParams(_) => ErrorCodeV1::InvalidParams,
        RequestError::NotJson(_)
        | RequestError::UnknownVersion(_)
        | RequestError::UnknownReply(_) => ErrorCodeV1::BadRequest,
        RequestError::UnknownCallbackEvent(_) => ErrorCodeV1::InvalidCallback,
    }
}

impl RequestConsumer {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.consume(&shutdown) => r,
            };
            match result {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(message = "request queue consumer stopped; reconnecting", queue = %self.queue, %error);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RECONNECT_DELAY) => {}
            }
        }
    }

    /// Consume until the connection fails (`Err`) or shutdown (`Ok`). A request in hand
    /// is finished before shutdown is looked at.
    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), QueueError> {
        let conn: Connection = self.brokers.connect("tasuki requests").await?;
        let channel = conn.create_channel().await.map_err(unavailable)?;
        declare_topology(&channel, &self.queue, self.kind).await?;
        channel
            .basic_qos(1, BasicQosOptions { global: false })
            .await
            .map_err(unavailable)?;
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "tasuki-requests".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        tracing::info!(message = "consuming run requests", queue = %self.queue);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(unavailable(e)),
                None => {
                    return Err(QueueError::Unavailable(
                        "consumer closed by the broker".into(),
                    ));
                }
            };
            self.handle(delivery).await?;
        }
    }

    async fn handle(&self, delivery: Delivery) -> Result<(), QueueError> {
        let verdict = self.decide(&delivery).await;
        let settled = match verdict {
            Verdict::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
            Verdict::Requeue => {
                tokio::time::sleep(REQUEUE_DELAY).await;
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await
            }
            Verdict::Refuse(code, message) => {
                tracing::warn!(message = "run request refused", queue = %self.queue, code = code.as_str(), reason = %message);
                if let Err(error) = self.refuse(&delivery, &code, &message).await {
                    tracing::warn!(message = "dead-lettering a refused request failed; it is put back", %error);
                    tokio::time::sleep(REQUEUE_DELAY).await;
                    delivery
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            multiple: false,
                        })
                        .await
                } else {
                    delivery.acker.ack(BasicAckOptions::default()).await
                }
            }
        };
        match settled {
            Ok(true) => Ok(()),
            Ok(false) => Err(QueueError::Unavailable(
                "channel closed before the acknowledgement was sent".into(),
            )),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn decide(&self, delivery: &Delivery) -> Verdict {
        let props = &delivery.properties;
        let request = match parse_request(&delivery.data) {
            Ok(r) => r,
            Err(e) => return Verdict::Refuse(request_error_code(&e), e.to_string()),
        };
        let key = match idempotency_key(short(props.message_id())) {
            Ok(k) => k,
            Err(message) => return Verdict::Refuse(ErrorCodeV1::BadRequest, message),
        };
        let requested_by = short(props.user_id());
        let scope = format!("amqp:{}", requested_by.as_deref().unwrap_or("anonymous"));
        let requester = Requester {
            requested_by,
            reply_to: short(props.reply_to()).map(|to| ReplyAddress {
                to,
                correlation_id: short(props.correlation_id()),
            }),
            replies: request.replies,
        };
        let requester_again = requester.clone();
        // As over HTTP: a callback the guard refuses is refused with the request.
        let target = request
            .callback
            .clone()
            .or_else(|| self.runs.job(&request.job).and_then(|j| j.callback.clone()));
        if let Some(target) = &target
            && let Err(refused) = self.callbacks.check(&target.url).await
        {
            return Verdict::Refuse(
                ErrorCodeV1::InvalidCallback,
                format!("callback {}: {refused}", target.url),
            );
        }
        let result = self
            .runs
            .accept_from(
                &request.job,
                request.params,
                key.map(|k| (scope, k)),
                requester,
                request.callback,
            )
            .await;
        match result {
            Ok(Accepted::Existing(run)) => {
                // A redelivery or a producer's retry: the same run, and the replies this
                // request asks for (a redelivery's are owed already and not doubled).
                if let Err(error) = self
                    .replies
                    .add_replies(run.id, &requester_again, chrono::Utc::now())
                    .await
                {
                    tracing::warn!(message = "replies of a repeated request not stored; put back", run_id = %run.id, %error);
                    return Verdict::Requeue;
                }
                self.replies_wake.notify_one();
                Verdict::Ack
            }
            Ok(Accepted::New(run)) => {
                tracing::info!(message = "run requested over the request queue", run_id = %run.id, job = %run.job, requested_by = run.requested_by.as_deref().unwrap_or("anonymous"));
                self.replies_wake.notify_one();
                Verdict::Ack
            }
            Err(e @ AcceptError::UnknownJob(_)) => {
                Verdict::Refuse(ErrorCodeV1::UnknownJob, e.to_string())
            }
            Err(AcceptError::Params(p)) => {
                Verdict::Refuse(ErrorCodeV1::InvalidParams, p.to_string())
            }
            Err(AcceptError::Limit(l @ ParamLimitError::TooMany { .. })) => {
                Verdict::Refuse(ErrorCodeV1::InvalidParams, l.to_string())
            }
            Err(AcceptError::Limit(l)) => {
                Verdict::Refuse(ErrorCodeV1::ParamTooLarge, l.to_string())
            }
            Err(e @ AcceptError::KeyReused { .. }) => {
                Verdict::Refuse(ErrorCodeV1::IdempotencyKeyReused, e.to_string())
            }
            Err(e @ (AcceptError::KeyInFlight(_) | AcceptError::Store(_))) => {
                tracing::warn!(message = "run request not stored; put back", error = %e);
                Verdict::Requeue
            }
        }
    }

    /// Answer the producer (if it asked for replies) and publish the request into the
    /// dead-letter queue with the error in its headers. A reject would keep only the
    /// original headers, so tasuki publishes the copy itself, with a confirm.
    async fn refuse(
        &self,
        delivery: &Delivery,
        code: &ErrorCodeV1,
        message: &str,
    ) -> Result<(), QueueError> {
        let props = &delivery.properties;
        if let Some(to) = short(props.reply_to()) {
            let body = serde_json::to_vec(&ErrorBodyV1::new(code.clone(), message))
                .map_err(|e| QueueError::Unavailable(e.to_string()))?;
            let mut headers = FieldTable::default();
            headers.insert("x-tasuki-error-code".into(), text(code.as_str()));
            let mut reply = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(headers);
            if let Some(id) = props.correlation_id() {
                reply = reply.with_correlation_id(id.clone());
            }
            if let Err(error) = self.replier.publish(&to, &body, reply).await {
                // The refusal still goes to the dead-letter queue: that is the record.
                tracing::warn!(message = "error reply not delivered", to = %to, %error);
            }
        }
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert("x-tasuki-error-code".into(), text(code.as_str()));
        headers.insert("x-tasuki-error-message".into(), text(message));
        let dead = props.clone().with_headers(headers);
        self.replier
            .publish(&dead_letter_queue(&self.queue), &delivery.data, dead)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_follow_the_idempotency_key_rules() {
        assert_eq!(idempotency_key(None), Ok(None));
        assert_eq!(
            idempotency_key(Some("order-42".into())),
            Ok(Some("order-42".into()))
        );
        assert!(idempotency_key(Some("has space".into())).is_err());
        assert!(idempotency_key(Some("x".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1))).is_err());
    }
}
