//! A running peer: the actor that owns the libp2p swarm, and the handles that talk to it.
//!
//! [`Node::start`] builds the swarm, starts listening, spawns the actor (one task that owns
//! the swarm and nothing else touches) and, if configured, the HTTP API. Everything else uses
//! a [`NodeHandle`]: cloneable, cheap, and talking to the actor over one bounded channel with a
//! `oneshot` reply per command. [`Node::shutdown`] stops the API, the actor and the handlers,
//! in that order, and waits for each.

mod actor;
pub mod answer;
mod behaviour;
mod error;
pub mod private;
pub mod repair;
mod subscription;

use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::Instrument as _;

pub use crate::proto::PeerInfo;
pub use answer::MAX_ANSWER;
pub use behaviour::{HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, MAX_PENDING, MAX_PER_PEER};
pub use error::NodeError;
pub use subscription::Subscription;

use crate::config::file::ConfigFileError;
use crate::config::{Config, Mesh};
use crate::event::{self, Event, EventError, Payload};
use crate::handlers::{Action, BoxError, HandlerInfo, HandlerSpec, Handlers};
use crate::keyring::{Keyring, LiveKeyring};
use crate::proto::groups::GroupView;
use crate::proto::Unstamped;
use crate::stats::{Counters, Stats};
use crate::store::{LogStatus, Store};
use crate::topic::{Pattern, Topic};

/// Commands waiting for the actor. Publishers wait when it is full (backpressure).
const COMMAND_CAPACITY: usize = 1024;

/// Answers of this peer's reply rows waiting for the swarm task.
const ANSWER_QUEUE: usize = 1024;

/// How long [`Node::start`] waits for its listeners to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a publish did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    /// The new event's id.
    pub id: String,
    /// Its sequence number from this peer.
    pub seq: u64,
    /// Peers the message was sent to directly (every connected meshbus peer). With none,
    /// peers fetch it from this peer's log when they connect.
    pub sent_to: usize,
}

/// The node's view of itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Our peer id.
    pub peer_id: String,
    /// Our name.
    pub name: Option<String>,
    /// meshbus version.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: f64,
    /// Where we listen.
    pub listen_addrs: Vec<String>,
    /// Where the HTTP API is: filled in by the API server that answers, since a node does
    /// not know who serves it.
    pub api: Option<String>,
    /// Whether mDNS discovery is on.
    pub mdns: bool,
    /// Connected meshbus peers.
    pub peers: usize,
    /// Peers in our gossipsub mesh.
    pub mesh_peers: usize,
    /// Largest event accepted.
    pub max_event_size: usize,
    /// Counters since start.
    pub counters: Counters,
    /// Publish-to-arrival time of events from other peers.
    pub receive_latency: crate::stats::Latency,
    /// The event log.
    pub log: LogStatus,
    /// Publishers (streams) followed, and events held waiting for a gap before them.
    pub streams: usize,
    /// Events held waiting for a gap before them to be filled.
    pub buffered: usize,
    /// Events the ACL refused, by publisher (the first 256 publishers refused).
    #[serde(default)]
    pub forbidden_by: std::collections::BTreeMap<String, u64>,
    /// Peers banned now, for flooding or invalid messages.
    #[serde(default)]
    pub banned: Vec<String>,
    /// Handler groups as this peer sees them: its own, and those it heard of.
    #[serde(default)]
    pub groups: Vec<GroupView>,
    /// Queries of this peer's still open for answers.
    #[serde(default)]
    pub open_queries: usize,
    /// The handler table.
    pub handlers: Vec<HandlerInfo>,
    /// Open `tail` subscriptions.
    pub subscribers: usize,
}

/// Most queries of one peer open at once.
pub const MAX_OPEN_QUERIES: usize = 256;

/// Most answers one query takes; later ones are dropped and counted.
pub const MAX_ANSWERS: usize = 1024;

/// Longest a query waits for answers.
pub const MAX_QUERY_TIMEOUT: Duration = Duration::from_secs(300);

/// How a query is asked.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// How long to wait for answers.
    pub timeout: Duration,
    /// Ask only the reply rows of this group; its owner of the query answers, so one answer
    /// comes (load-balanced request/reply).
    pub group: Option<String>,
}

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            group: None,
        }
    }
}

/// One peer's answer to a query.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueryAnswer {
    /// The answering peer.
    pub peer: String,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// The row that answered.
    pub handler: String,
    /// From the query's publish to the answer's arrival.
    pub latency_ms: f64,
    /// The answer, when the row succeeded.
    pub answer: Option<serde_json::Value>,
    /// Why the row failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A query on its way: its answers as they come, until its timeout.
pub struct Query {
    /// The query event's id.
    pub id: String,
    /// Mesh members connected when it was asked.
    pub asked: usize,
    answers: mpsc::Receiver<QueryAnswer>,
    deadline: tokio::time::Instant,
}

impl Query {
    /// The next answer, or `None` once the timeout has passed.
    pub async fn next(&mut self) -> Option<QueryAnswer> {
        tokio::time::timeout_at(self.deadline, self.answers.recv())
            .await
            .ok()
            .flatten()
    }
}

/// Requests to the actor; each carries its reply channel.
enum Command {
    Publish {
        event: Unstamped,
        reply: oneshot::Sender<Result<Published, NodeError>>,
    },
    /// Several events, published in this order and answered together.
    PublishMany {
        events: Vec<Unstamped>,
        reply: oneshot::Sender<Result<Vec<Published>, NodeError>>,
    },
    /// A query: published like an event, then open for answers until `deadline`.
    Query {
        event: Unstamped,
        answers: mpsc::Sender<QueryAnswer>,
        deadline: std::time::Instant,
        reply: oneshot::Sender<Result<(Published, usize), NodeError>>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    Status {
        reply: oneshot::Sender<SwarmStatus>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    /// Replies once every listener has reported an address (or failed).
    WaitListening {
        reply: oneshot::Sender<Result<Vec<Multiaddr>, NodeError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// What `status` needs from the swarm task.
struct SwarmStatus {
    listen_addrs: Vec<String>,
    peers: usize,
    mesh_peers: usize,
    streams: usize,
    buffered: usize,
    forbidden_by: std::collections::BTreeMap<String, u64>,
    banned: Vec<String>,
    groups: Vec<GroupView>,
    open_queries: usize,
}

/// State shared by the actor, the handles and the API; none of it touches the swarm.
struct Shared {
    peer_id: PeerId,
    name: Option<String>,
    started: std::time::Instant,
    mdns: bool,
    max_event_size: usize,
    /// Who may publish what: checked on our own events and on every received one.
    acl: crate::proto::Acl,
    /// Gossip each author may send: messages and bytes a second.
    rate: (u32, u64),
    stats: Arc<Stats>,
    handlers: Handlers,
    store: Store,
    /// Every event this peer sees (its own included), for `tail` subscribers.
    tail: broadcast::Sender<Arc<Event>>,
    /// Builds the handler table afresh for a reload.
    reload: std::sync::Mutex<Option<ReloadSource>>,
}

type ReloadSource = Box<dyn Fn() -> Result<Vec<HandlerSpec>, ConfigFileError> + Send + Sync>;

/// Hands every event the log takes in, from the end of the log at start, to `tail`
/// subscribers (who see events once they are stored, in log order).
async fn feed_tail(store: Store, tail: broadcast::Sender<Arc<Event>>) {
    let mut after = store.last();
    let mut head = store.head();
    loop {
        head.borrow_and_update();
        let batch = match store.read_after(after, 1024) {
            Ok(batch) => batch,
            Err(error) => {
                crate::store::warn_log_failed("tail", &error);
                return;
            }
        };
        if batch.is_empty() {
            if head.changed().await.is_err() {
                return;
            }
            continue;
        }
        for (offset, event) in batch {
            after = offset;
            let _ = tail.send(event);
        }
    }
}

/// A cloneable handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// A running node: its handle plus the tasks to wait for at shutdown.
pub struct Node {
    handle: NodeHandle,
    actor: tokio::task::JoinHandle<()>,
    tail: tokio::task::JoinHandle<()>,
    shutdown_grace: Duration,
}

impl Node {
    /// Starts a node: listens, dials `config.peers`, starts discovery. Returns once every
    /// listener has its address. The HTTP API is its owner's to serve (`meshbus::api::serve`).
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        config.validate()?;
        let keypair = config
            .keypair
            .clone()
            .unwrap_or_else(Keypair::generate_ed25519);
        let peer_id = keypair.public().to_peer_id();
        let agent = crate::proto::peers::agent(config.name.as_deref());
        let stats = Arc::new(Stats::default());
        let guard = match &config.mesh {
            Mesh::Open => None,
            Mesh::Keys(ring) => Some(LiveKeyring::fixed(ring.clone())),
            Mesh::DataDir => {
                let dir = config.data_dir.as_deref().ok_or(NodeError::NoMeshKey)?;
                let (ring, _) = Keyring::load_or_create(dir)?;
                Some(LiveKeyring::watching(dir, ring))
            }
        }
        .map(|keys| private::Guard {
            keys: Arc::new(keys),
            stats: stats.clone(),
            pending: Default::default(),
        });
        let mut swarm = behaviour::build_swarm(keypair, config.mdns, agent, guard)?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|source| NodeError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
        }
        let (store, opened) = Store::open(config.data_dir.as_deref(), peer_id, config.retention)?;
        let replay_from = match config.replay {
            Some(span) => {
                let since = std::time::SystemTime::now()
                    .checked_sub(span)
                    .unwrap_or(std::time::UNIX_EPOCH);
                Some(store.offset_since(since)?)
            }
            None => None,
        };
        let handlers = Handlers::new(
            stats.clone(),
            config.handler_queue,
            config.exec_timeout,
            store.clone(),
            replay_from,
        );
        let (answers_tx, answers_rx) = mpsc::channel(ANSWER_QUEUE);
        handlers.connect(peer_id, answers_tx);
        handlers.replace(config.handlers.clone())?;
        handlers.end_replay();
        let shared = Arc::new(Shared {
            peer_id,
            name: config.name.clone(),
            started: std::time::Instant::now(),
            mdns: config.mdns,
            max_event_size: config.max_event_size,
            acl: config.acl.clone(),
            rate: (config.max_messages_per_sec, config.max_bytes_per_sec),
            handlers,
            stats,
            store: store.clone(),
            tail: broadcast::channel(config.tail_buffer).0,
            reload: std::sync::Mutex::new(None),
        });
        let (commands, rx) = mpsc::channel(COMMAND_CAPACITY);
        let actor = actor::Actor::new(
            swarm,
            rx,
            answers_rx,
            shared.clone(),
            &opened,
            config.peers.clone(),
            config.listen.len(),
        )?;
        let span = tracing::info_span!("node", peer = %peer_id);
        let actor = tokio::spawn(actor.run().instrument(span.clone()));
        let tail = tokio::spawn(feed_tail(store, shared.tail.clone()).instrument(span));
        let handle = NodeHandle { commands, shared };

        let node = Node {
            handle: handle.clone(),
            actor,
            tail,
            shutdown_grace: config.shutdown_grace,
        };
        let listening = async {
            let (reply, rx) = oneshot::channel();
            handle.send(Command::WaitListening { reply }).await?;
            rx.await.map_err(|_| NodeError::Stopped)?
        };
        let ready = match tokio::time::timeout(LISTEN_TIMEOUT, listening).await {
            Ok(result) => result,
            Err(_) => Err(NodeError::ListenTimeout(LISTEN_TIMEOUT)),
        };
        if let Err(e) = ready {
            node.shutdown().await;
            return Err(e);
        }
        Ok(node)
    }

    /// A handle for publishing, subscribing and asking questions.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Stops the swarm task (saying goodbye to every peer and closing every connection),
    /// then the handlers (which get `shutdown_grace` to finish what is queued before being
    /// cancelled), then the log (writing the handlers' cursors). Stop the API first, if one
    /// serves this node.
    pub async fn shutdown(self) {
        let (reply, rx) = oneshot::channel();
        if self
            .handle
            .commands
            .send(Command::Shutdown { reply })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let _ = self.actor.await;
        let shared = &self.handle.shared;
        shared.handlers.shutdown(self.shutdown_grace).await;
        self.tail.abort();
        shared.store.close().await;
    }
}

impl std::ops::Deref for Node {
    type Target = NodeHandle;
    fn deref(&self) -> &NodeHandle {
        &self.handle
    }
}

impl NodeHandle {
    /// This peer's id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    async fn send(&self, command: Command) -> Result<(), NodeError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// The largest event this node accepts, in bytes.
    pub fn max_event_size(&self) -> usize {
        self.shared.max_event_size
    }

    /// Checks an event against the rules ([`event::validate`]) without publishing it;
    /// the event type defaults to the topic.
    pub fn check(
        &self,
        topic: &str,
        event_type: Option<&str>,
        payload: Payload,
    ) -> Result<Unstamped, EventError> {
        let topic = Topic::user(topic)?;
        if !self.shared.acl.may_publish(&self.shared.peer_id, &topic) {
            return Err(EventError::Forbidden(topic.to_string()));
        }
        let event_type = event_type.unwrap_or(topic.as_str()).to_owned();
        event::validate(
            &topic,
            &event_type,
            &payload.content_type,
            &payload.data,
            self.shared.max_event_size,
        )?;
        Ok(Unstamped {
            topic,
            event_type,
            payload,
        })
    }

    /// Publishes an event to every peer; this peer's own handlers get it too.
    /// `event_type` defaults to the topic.
    pub async fn publish(
        &self,
        topic: &str,
        event_type: Option<&str>,
        payload: Payload,
    ) -> Result<Published, NodeError> {
        let event = self.check(topic, event_type, payload)?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Publish { event, reply }).await?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Publishes several events in this order, packed into as few messages as fit. Every
    /// event is checked before any is published; the first bad one is named by its index.
    pub async fn publish_many(
        &self,
        events: Vec<(String, Option<String>, Payload)>,
    ) -> Result<Vec<Published>, NodeError> {
        let mut checked = Vec::with_capacity(events.len());
        for (i, (topic, event_type, payload)) in events.into_iter().enumerate() {
            let event = self
                .check(&topic, event_type.as_deref(), payload)
                .map_err(|error| NodeError::InBatch {
                    index: i,
                    error: Box::new(NodeError::Event(error)),
                })?;
            checked.push(event);
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::PublishMany {
            events: checked,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Publishes any serde value as JSON.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<Published, NodeError> {
        let payload = Payload::json(value)?;
        self.publish(topic, None, payload).await
    }

    /// Adds a row to this peer's handler table that stays across reloads; returns its name.
    pub fn add_handler(&self, spec: HandlerSpec) -> Result<String, NodeError> {
        Ok(self.shared.handlers.add(spec)?)
    }

    /// Registers async Rust code for every event matching `pattern`, with the same queue,
    /// concurrency and accounting as any row (see [`Node::add_handler`] for options).
    pub fn on<F, Fut>(&self, pattern: Pattern, f: F) -> Result<String, NodeError>
    where
        F: Fn(Arc<Event>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let action = Action::Rust(Arc::new(move |event| {
            let f = f.clone();
            Box::pin(async move { f(event).await })
        }));
        self.add_handler(HandlerSpec::new(pattern, action))
    }

    /// Like [`NodeHandle::on`], with the event's JSON data decoded as `T` first; an event
    /// whose data is not a `T` is a failure of this row, logged with the reason.
    pub fn on_json<T, F, Fut>(&self, pattern: Pattern, f: F) -> Result<String, NodeError>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
        F: Fn(Arc<Event>, T) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.on(pattern, move |event| {
            let f = f.clone();
            async move {
                let data: T = event
                    .data_json()
                    .map_err(|e| format!("data is not a {}: {e}", std::any::type_name::<T>()))?;
                f(event, data).await
            }
        })
    }

    /// Replaces the configured rows of the handler table at once (rows added with
    /// [`NodeHandle::add_handler`] stay). A refused table changes nothing.
    pub fn set_handlers(&self, specs: Vec<HandlerSpec>) -> Result<Vec<String>, NodeError> {
        Ok(self.shared.handlers.replace(specs)?)
    }

    /// Where [`NodeHandle::reload`] gets the table from (the CLI: the config file and `--on`).
    pub fn set_reload_source(
        &self,
        source: impl Fn() -> Result<Vec<HandlerSpec>, ConfigFileError> + Send + Sync + 'static,
    ) {
        *self.shared.reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(source));
    }

    /// Re-reads the handler table from the reload source and swaps it in; on any error the
    /// old table stays and the error says why.
    pub fn reload(&self) -> Result<Vec<String>, NodeError> {
        if self.commands.is_closed() {
            return Err(NodeError::Stopped);
        }
        let specs = {
            let source = self.shared.reload.lock().unwrap_or_else(|p| p.into_inner());
            let source = source.as_ref().ok_or(NodeError::NoReloadSource)?;
            source().map_err(NodeError::Reload)?
        };
        let names = self.set_handlers(specs)?;
        tracing::info!(handlers = names.len(), "handler table reloaded");
        Ok(names)
    }

    /// A live stream of the events this peer sees whose topic matches `pattern`.
    pub fn subscribe(&self, pattern: Pattern) -> Subscription {
        Subscription::new(
            pattern,
            self.shared.tail.subscribe(),
            self.shared.stats.clone(),
        )
    }

    /// Connected meshbus peers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Peers { reply }).await?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Dials an address (e.g. `/ip4/10.0.0.2/tcp/7421`).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Dial { addr, reply }).await?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// The node's view of itself.
    pub async fn status(&self) -> Result<Status, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Status { reply }).await?;
        let swarm = rx.await.map_err(|_| NodeError::Stopped)?;
        let s = &self.shared;
        Ok(Status {
            peer_id: s.peer_id.to_string(),
            name: s.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: s.started.elapsed().as_secs_f64(),
            listen_addrs: swarm.listen_addrs,
            api: None,
            mdns: s.mdns,
            peers: swarm.peers,
            mesh_peers: swarm.mesh_peers,
            max_event_size: s.max_event_size,
            counters: s.stats.snapshot(),
            receive_latency: s.stats.receive_latency.summary(),
            log: s.store.status(),
            streams: swarm.streams,
            buffered: swarm.buffered,
            forbidden_by: swarm.forbidden_by,
            banned: swarm.banned,
            groups: swarm.groups,
            open_queries: swarm.open_queries,
            handlers: s.handlers.list(),
            subscribers: s.tail.receiver_count(),
        })
    }

    /// The handler table with its counters.
    pub fn handlers(&self) -> Vec<HandlerInfo> {
        self.shared.handlers.list()
    }

    /// Handler groups as this peer sees them.
    pub async fn groups(&self) -> Result<Vec<GroupView>, NodeError> {
        Ok(self.status().await?.groups)
    }

    /// Asks the mesh: publishes a query event on `topic` and returns its answers as they
    /// come, one per answering peer, until `options.timeout`. Rows with `reply` whose pattern
    /// matches answer (with `options.group`, only that group's owner of the query).
    pub async fn query(
        &self,
        topic: &str,
        payload: Payload,
        options: QueryOptions,
    ) -> Result<Query, NodeError> {
        let event_type = match &options.group {
            Some(group) => {
                crate::proto::groups::check_name(group).map_err(NodeError::BadQuery)?;
                format!("{}/{group}", event::QUERY_TYPE)
            }
            None => event::QUERY_TYPE.to_owned(),
        };
        if options.timeout.is_zero() || options.timeout > MAX_QUERY_TIMEOUT {
            return Err(NodeError::BadQuery(format!(
                "a query waits more than 0 and at most {MAX_QUERY_TIMEOUT:?}"
            )));
        }
        let event = self.check(topic, Some(&event_type), payload)?;
        let (tx, answers) = mpsc::channel(MAX_ANSWERS);
        let deadline = tokio::time::Instant::now() + options.timeout;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Query {
            event,
            answers: tx,
            deadline: deadline.into_std(),
            reply,
        })
        .await?;
        let (published, asked) = rx.await.map_err(|_| NodeError::Stopped)??;
        Ok(Query {
            id: published.id,
            asked,
            answers,
            deadline,
        })
    }

    /// Registers async Rust code that answers queries matching `pattern`: its value goes
    /// back to the asker. Like [`NodeHandle::on`] otherwise.
    pub fn on_query<F, Fut>(&self, pattern: Pattern, f: F) -> Result<String, NodeError>
    where
        F: Fn(Arc<Event>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<serde_json::Value, BoxError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let action = Action::Query(Arc::new(move |event| {
            let f = f.clone();
            Box::pin(async move { f(event).await })
        }));
        let mut spec = HandlerSpec::new(pattern, action);
        spec.reply = true;
        self.add_handler(spec)
    }
}
