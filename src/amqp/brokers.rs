//! The broker URLs a process may connect to: the nodes of one RabbitMQ cluster, tried
//! in turn at every (re)connect, so that a process whose node went away carries on
//! with the next node that answers.

use std::sync::atomic::{AtomicUsize, Ordering};

use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};

use super::{CONNECT_TIMEOUT, unavailable};
use crate::domain::ports::QueueError;

/// The nodes, in the order given, and where the next connect starts: at the first
/// URL, and after a connect at the URL following the one that answered. A connection
/// is made again only when the last one failed (or the broker refused what was asked
/// of it), so the node it was on is then tried last, not first.
pub struct Brokers {
    urls: Vec<String>,
    start: AtomicUsize,
}

impl Brokers {
    pub fn new(urls: &[String]) -> Self {
        Self {
            urls: urls.to_vec(),
            start: AtomicUsize::new(0),
        }
    }

    /// The indexes of the URLs in the order the next connect tries them.
    fn order(&self) -> impl Iterator<Item = usize> + use<> {
        let n = self.urls.len();
        let start = self.start.load(Ordering::SeqCst) % n.max(1);
        (0..n).map(move |i| (start + i) % n)
    }

    /// Connect to the first URL in turn whose broker answers within
    /// [`CONNECT_TIMEOUT`]. With one URL, exactly what connecting to it does.
    pub async fn connect(&self, name: &str) -> Result<Connection, QueueError> {
        if let [url] = self.urls.as_slice() {
            return connect_one(url, name).await;
        }
        let mut failed = Vec::new();
        for i in self.order() {
            let url = &self.urls[i];
            match connect_one(url, name).await {
                Ok(conn) => {
                    self.start
                        .store((i + 1) % self.urls.len(), Ordering::SeqCst);
                    if failed.is_empty() {
                        tracing::info!(message = "connected to the broker", broker = %shown(url), connection = name);
                    } else {
                        tracing::warn!(message = "connected to the next broker", broker = %shown(url), connection = name, unreachable = %failed.join("; "));
                    }
                    return Ok(conn);
                }
                Err(error) => failed.push(format!("{}: {error}", shown(url))),
            }
        }
        Err(QueueError::Unavailable(if failed.is_empty() {
            "no broker URL given".to_owned()
        } else {
            format!("no broker answered: {}", failed.join("; "))
        }))
    }
}

async fn connect_one(url: &str, name: &str) -> Result<Connection, QueueError> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned()));
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(unavailable(format!("connecting to the broker: {e}"))),
        Err(_) => Err(unavailable("connecting to the broker timed out")),
    }
}

/// A broker URL as logs and messages show it: the password replaced.
pub fn shown(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_none() {
                return parsed.to_string();
            }
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        // Whatever does not parse may hold a password where a host would be.
        Err(_) => "[a URL that does not parse]".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brokers(urls: &[&str]) -> Brokers {
        Brokers::new(&urls.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn the_order_starts_after_the_node_that_answered_last() {
        let b = brokers(&["amqp://a", "amqp://b", "amqp://c"]);
        assert_eq!(b.order().collect::<Vec<_>>(), [0, 1, 2]);
        b.start.store(2, Ordering::SeqCst);
        assert_eq!(b.order().collect::<Vec<_>>(), [2, 0, 1]);
        let one = brokers(&["amqp://a"]);
        one.start.store(1, Ordering::SeqCst);
        assert_eq!(one.order().collect::<Vec<_>>(), [0]);
        assert_eq!(brokers(&[]).order().count(), 0);
    }

    #[test]
    fn a_shown_url_has_no_password() {
        assert_eq!(
            shown("amqp://tasuki:s3cret@rabbit-1:5672/%2f"),
            "amqp://tasuki:***@rabbit-1:5672/%2f"
        );
        assert_eq!(
            shown("amqp://rabbit-1:5672/%2f"),
            "amqp://rabbit-1:5672/%2f"
        );
        assert!(!shown("amqp://u:s3cret@[bad").contains("s3cret"));
        assert!(!shown("amqp://u:s3cret").contains("s3cret"));
    }

    /// A free loopback port nobody listens on.
    fn dead_url() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        format!("amqp://guest:s3cret@127.0.0.1:{port}/%2f")
    }

    fn test_url() -> String {
        std::env::var("TASUKI_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
    }

    #[tokio::test]
    async fn a_dead_node_is_passed_over_for_the_next_that_answers() {
        let dead = dead_url();
        let b = Brokers::new(&[dead.clone(), test_url()]);
        let conn = b
            .connect("tasuki brokers test")
            .await
            .expect("the live broker");
        // The next connect starts after the live node: at the dead one, then the live.
        assert_eq!(b.order().collect::<Vec<_>>(), [0, 1]);
        // A queue of the test's own, on the connection made: declared and deleted.
        let channel = conn.create_channel().await.expect("channel");
        let queue = format!("tasuki-brokers-test-{}", ulid::Ulid::new());
        let options = lapin::options::QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.as_str().into(), options, Default::default())
            .await
            .expect("declare");
        channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .expect("delete");
        let _ = conn.close(200, "bye".into()).await;
        // Again, from the dead node on.
        let again = b
            .connect("tasuki brokers test")
            .await
            .expect("the live broker");
        let _ = again.close(200, "bye".into()).await;

        let all_dead = Brokers::new(&[dead.clone(), dead_url()]);
        let Err(QueueError::Unavailable(e)) = all_dead.connect("tasuki brokers test").await else {
            panic!("connected to no broker at all");
        };
        assert!(e.starts_with("no broker answered: "), "{e}");
        assert!(e.contains("127.0.0.1:"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }
}
