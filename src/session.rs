//! Sessions with peers: which store epoch each peer is at, opening and sealing
//! payloads under keys bound to both stores' epochs, and replay windows.
//!
//! A payload opens only under the key of (sender's epoch, receiver's *current*
//! epoch): a payload sealed for an earlier store of ours no longer opens, so
//! nothing captured before a store was lost or went back in time can be replayed
//! into the new one. Payloads from an epoch of the peer's that was replaced are
//! refused for good ([`Refusal::Retired`]), and within one epoch the replay window
//! refuses a counter seen before.
//!
//! Epochs have no order, and a payload from a store that has since been replaced
//! can arrive late, after its successor's. So a peer's new epoch is adopted only
//! when confirmed: a payload from an epoch other than the one we know is answered
//! with a challenge (a hello sealed for that epoch, with a fresh nonce), and the
//! epoch is adopted when a Sync sealed from it echoes the nonce. A dead store never
//! answers; the live one does within a round trip.
//!
//! Pure: no I/O, no clock. [`crate::node::Node`] loads the persisted part from the
//! store, asks here how to open and seal, and writes back what changed.

use std::collections::BTreeMap;

use x25519_dalek::PublicKey;

use crate::frame::Name;
use crate::seal::{self, DirectionKey, Ends, Header, SealError, Window};
use crate::store::PeerSession;
use crate::trust::Keys;

/// Why a payload was not accepted. [`Refusal::kind`] names the kind, a bounded set,
/// for counters and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a sealed payload of a version we know.
    Unsealed(SealError),
    /// From a name not in the trust file (or our own name).
    Untrusted(Name),
    /// The sender did not say its epoch and we never learned it.
    UnknownEpoch(Name),
    /// Sealed for an earlier store of ours: the sender has to learn our epoch.
    /// `claims` is the epoch the header says the sender is at, if it says one.
    StaleEpoch { from: Name, claims: Option<u64> },
    /// From an earlier store of the sender, which was replaced.
    Retired(Name),
    /// The tag does not verify: forged, damaged, or sealed with another key
    /// (or for a stale epoch of ours whose hint happens to match).
    BadSeal { from: Name, claims: Option<u64> },
    /// A counter already accepted.
    Replay(Name),
    /// Sealed without knowing our epoch, but carrying more than a hello.
    BadProbe(Name),
    /// From a store of the sender we have not confirmed yet; challenged.
    Unconfirmed(Name),
}

/// The kinds of [`Refusal`], for counting and logging without growing with the
/// names an attacker makes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalKind {
    Unsealed,
    Untrusted,
    UnknownEpoch,
    StaleEpoch,
    Retired,
    BadSeal,
    Replay,
    BadProbe,
    Unconfirmed,
}

impl RefusalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::Unsealed => "unsealed",
            RefusalKind::Untrusted => "untrusted sender",
            RefusalKind::UnknownEpoch => "sender epoch unknown",
            RefusalKind::StaleEpoch => "sealed for an earlier store of this node",
            RefusalKind::Retired => "from a replaced store of the sender",
            RefusalKind::BadSeal => "bad seal",
            RefusalKind::Replay => "replay",
            RefusalKind::BadProbe => "bad hello",
            RefusalKind::Unconfirmed => "from an unconfirmed store of the sender",
        }
    }
}

impl Refusal {
    pub fn kind(&self) -> RefusalKind {
        match self {
            Refusal::Unsealed(_) => RefusalKind::Unsealed,
            Refusal::Untrusted(_) => RefusalKind::Untrusted,
            Refusal::UnknownEpoch(_) => RefusalKind::UnknownEpoch,
            Refusal::StaleEpoch { .. } => RefusalKind::StaleEpoch,
            Refusal::Retired(_) => RefusalKind::Retired,
            Refusal::BadSeal { .. } => RefusalKind::BadSeal,
            Refusal::Replay(_) => RefusalKind::Replay,
            Refusal::BadProbe(_) => RefusalKind::BadProbe,
            Refusal::Unconfirmed(_) => RefusalKind::Unconfirmed,
        }
    }

    /// The sender it names (as claimed: not authenticated unless it is a replay).
    pub fn sender(&self) -> Option<&Name> {
        match self {
            Refusal::Unsealed(_) => None,
            Refusal::Untrusted(n)
            | Refusal::UnknownEpoch(n)
            | Refusal::StaleEpoch { from: n, .. }
            | Refusal::Retired(n)
            | Refusal::BadSeal { from: n, .. }
            | Refusal::Replay(n)
            | Refusal::BadProbe(n)
            | Refusal::Unconfirmed(n) => Some(n),
        }
    }

    /// A trusted sender that would talk to us once it knew our epoch, or told us
    /// its own: worth a [`crate::frame::Body::Hello`] back, sealed for the epoch it
    /// claims (if it claims one).
    pub fn wants_hello(&self) -> Option<(&Name, Option<u64>)> {
        match self {
            Refusal::UnknownEpoch(n) => Some((n, None)),
            // A bad seal from a trusted name may be a stale epoch of ours whose
            // four-bit hint happens to match the current one.
            Refusal::StaleEpoch { from, claims } | Refusal::BadSeal { from, claims } => {
                Some((from, *claims))
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unsealed(e) => write!(f, "{e}"),
            Refusal::Untrusted(n) => write!(f, "{n} is not in the trust file"),
            Refusal::UnknownEpoch(n) => {
                write!(f, "{n} did not say which store it seals from; asked it")
            }
            Refusal::StaleEpoch { from, .. } => write!(
                f,
                "{from} sealed for an earlier store of this node; told it the current one"
            ),
            Refusal::Retired(n) => write!(f, "from an earlier store of {n}, since replaced"),
            Refusal::BadSeal { from, .. } => {
                write!(f, "claims to be from {from}: {}", SealError::BadTag)
            }
            Refusal::Replay(n) => write!(f, "payload from {n} seen before"),
            Refusal::BadProbe(n) => write!(
                f,
                "{n} sealed frames without knowing this node's store; only a hello may travel so"
            ),
            Refusal::Unconfirmed(n) => write!(
                f,
                "from a store of {n} other than the one known; challenged it to confirm"
            ),
        }
    }
}

/// An authentic payload, not yet accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub sender: Name,
    pub sender_epoch: u64,
    pub counter: u64,
    /// Sealed without knowing our epoch: may carry only a hello.
    pub probe: bool,
    /// From an epoch of the sender other than the one we know: adopted only once a
    /// challenge is answered (see [`Session::answers`]).
    pub unconfirmed: bool,
    /// Compact frames (see [`crate::frame::expand`]).
    pub plain: Vec<u8>,
}

/// What accepting a payload changed about its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// First payload from this epoch of the peer's store; `old` is the epoch we
    /// knew (0: none, the first contact).
    NewEpoch {
        old: u64,
    },
}

/// This node's side of every pairwise session.
#[derive(Debug)]
pub struct Session {
    me: Name,
    epoch: u64,
    keys: Keys,
    trusted: BTreeMap<Name, PublicKey>,
    peers: BTreeMap<Name, PeerSession>,
    /// Derived keys by (peer, outgoing?, sender epoch, receiver epoch).
    cache: BTreeMap<(Name, bool, u64, u64), DirectionKey>,
    /// Hellos out, by (peer, epoch they were sealed for; 0 for a probe): the
    /// latest few nonces (an answer to an earlier hello is still good).
    challenges: BTreeMap<(Name, u64), Vec<u64>>,
    next_nonce: u64,
}

impl Session {
    pub fn new(me: Name, epoch: u64, keys: Keys, peers: Vec<(Name, PeerSession)>) -> Session {
        Session {
            me,
            epoch,
            keys,
            trusted: BTreeMap::new(),
            peers: peers.into_iter().collect(),
            cache: BTreeMap::new(),
            challenges: BTreeMap::new(),
            next_nonce: epoch.rotate_left(17) | 1,
        }
    }

    /// A nonce for a hello, never 0 (0 is "no hello" in a Sync's echo).
    pub fn nonce(&mut self) -> u64 {
        self.next_nonce = self
            .next_nonce
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.next_nonce | 1
    }

    /// Records a hello to `peer`'s store `epoch` (0: whichever it is); returns
    /// its nonce.
    pub fn challenge(&mut self, peer: &Name, epoch: u64) -> u64 {
        let nonce = self.nonce();
        let nonces = self.challenges.entry((peer.clone(), epoch)).or_default();
        if nonces.len() >= 4 {
            nonces.remove(0);
        }
        nonces.push(nonce);
        nonce
    }

    /// Whether a Sync echoing `echo`, sealed by `peer`'s store `epoch`, answers a
    /// hello we sent to that store. A probe (sent before we knew any store of the
    /// peer) counts only for the store we then adopted: another store that answered
    /// it may be one that died after answering.
    pub fn answers(&self, peer: &Name, epoch: u64, echo: u64) -> bool {
        let known = self.peers.get(peer).map_or(0, |p| p.epoch);
        let sent = |e: u64| {
            self.challenges
                .get(&(peer.clone(), e))
                .is_some_and(|n| n.contains(&echo))
        };
        echo != 0 && (sent(epoch) || ((known == 0 || known == epoch) && sent(0)))
    }

    /// Forgets every hello sent to `peer` once one was answered: a late answer to
    /// an older one (perhaps from a store that has died since) must not count.
    /// Contending epochs are not retired for it: the one that answered may be the
    /// one that died, and only a store that was adopted and then replaced is
    /// known to be gone.
    pub fn settle(&mut self, peer: &Name) {
        self.challenges.retain(|(p, _), _| p != peer);
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn public(&self) -> &PublicKey {
        &self.keys.public
    }

    /// Replaces the public keys of the trusted peers; keys derived for a peer whose
    /// public key changed are forgotten.
    pub fn set_trust(&mut self, trusted: BTreeMap<Name, [u8; 32]>) {
        let trusted: BTreeMap<Name, PublicKey> = trusted
            .into_iter()
            .map(|(n, k)| (n, PublicKey::from(k)))
            .collect();
        self.cache
            .retain(|(peer, ..), _| trusted.get(peer) == self.trusted.get(peer));
        self.trusted = trusted;
    }

    pub fn is_trusted(&self, peer: &Name) -> bool {
        self.trusted.contains_key(peer)
    }

    pub fn trusted(&self) -> impl Iterator<Item = &Name> {
        self.trusted.keys()
    }

    pub fn peer(&self, peer: &Name) -> Option<&PeerSession> {
        self.peers.get(peer)
    }

    pub fn peer_mut(&mut self, peer: &Name) -> &mut PeerSession {
        self.peers.entry(peer.clone()).or_default()
    }

    pub fn peers(&self) -> impl Iterator<Item = (&Name, &PeerSession)> {
        self.peers.iter()
    }

    /// Forgets what is in memory and takes the store's view again (after a failed
    /// commit rolled back what was accepted).
    pub fn reload(&mut self, peers: Vec<(Name, PeerSession)>) {
        self.peers = peers.into_iter().collect();
    }

    /// Whether we applied the peer's Sync for both current epochs.
    pub fn synced(&self, peer: &Name) -> bool {
        self.peers.get(peer).is_some_and(|p| p.synced)
    }

    fn key(
        &mut self,
        peer: &Name,
        outgoing: bool,
        se: u64,
        re: u64,
    ) -> Result<&DirectionKey, SealError> {
        let k = (peer.clone(), outgoing, se, re);
        if !self.cache.contains_key(&k) {
            let theirs = *self.trusted.get(peer).ok_or(SealError::WeakKey)?;
            let ours = self.keys.public;
            let ends = if outgoing {
                Ends {
                    sender: &self.me,
                    receiver: peer,
                    sender_public: &ours,
                    receiver_public: &theirs,
                    sender_epoch: se,
                    receiver_epoch: re,
                }
            } else {
                Ends {
                    sender: peer,
                    receiver: &self.me,
                    sender_public: &theirs,
                    receiver_public: &ours,
                    sender_epoch: se,
                    receiver_epoch: re,
                }
            };
            let key = seal::derive(&self.keys.secret, &theirs, &ends)?;
            // A long-lived central meets many epochs; keep the cache bounded.
            if self.cache.len() >= 4 * self.trusted.len().max(64) {
                self.cache.clear();
            }
            self.cache.insert(k.clone(), key);
        }
        Ok(&self.cache[&k])
    }

    /// Checks and opens a payload from this node's inbox; changes nothing.
    pub fn open(&mut self, payload: &[u8]) -> Result<Opened, Refusal> {
        let (h, len) = Header::parse(payload, &self.me).map_err(Refusal::Unsealed)?;
        let from = h.sender.clone();
        if from == self.me || !self.trusted.contains_key(&from) {
            return Err(Refusal::Untrusted(from));
        }
        let known = self.peers.get(&from).cloned().unwrap_or_default();
        let sender_epoch = match (h.sender_epoch, known.epoch) {
            (Some(e), _) => e,
            (None, 0) => return Err(Refusal::UnknownEpoch(from)),
            (None, e) => e,
        };
        if known.retired.contains(&sender_epoch) {
            return Err(Refusal::Retired(from));
        }
        let (receiver_epoch, probe) = match h.receiver_hint {
            0 => (0, true),
            x if x == seal::hint(self.epoch) => (self.epoch, false),
            _ => {
                return Err(Refusal::StaleEpoch {
                    from,
                    claims: h.sender_epoch,
                })
            }
        };
        let bad_seal = || Refusal::BadSeal {
            from: from.clone(),
            claims: h.sender_epoch,
        };
        let key = self
            .key(&from, false, sender_epoch, receiver_epoch)
            .map_err(|_| bad_seal())?;
        let plain = seal::open(key, payload, &h, len).map_err(|_| bad_seal())?;
        let window = Window {
            highest: known.highest,
            bits: known.bits,
        };
        if sender_epoch == known.epoch && !window.fresh(h.counter) {
            return Err(Refusal::Replay(from));
        }
        Ok(Opened {
            unconfirmed: known.epoch != 0 && sender_epoch != known.epoch,
            sender: from,
            sender_epoch,
            counter: h.counter,
            probe,
            plain,
        })
    }

    /// Takes an opened payload as accepted: its counter is spent, its epoch
    /// adopted (first contact, or a confirmed new epoch). A new epoch makes the
    /// streams with that peer unsynchronised. `has_hello`: the payload carried a
    /// hello, which a peer also seals for an epoch of ours it has not adopted yet
    /// (a challenge), so it does not show that the peer knows ours.
    pub fn accept(&mut self, o: &Opened, has_hello: bool) -> Change {
        let p = self.peers.entry(o.sender.clone()).or_default();
        let mut change = Change::None;
        if o.sender_epoch != p.epoch {
            change = Change::NewEpoch { old: p.epoch };
            if p.epoch != 0 {
                p.retired.push(p.epoch);
            }
            p.epoch = o.sender_epoch;
            p.highest = 0;
            p.bits = 0;
            p.synced = false;
            // It may not know our epoch either (it is a new store).
            p.knows_mine = false;
            self.cache.retain(|(peer, ..), _| *peer != o.sender);
        }
        let mut w = Window {
            highest: p.highest,
            bits: p.bits,
        };
        w.mark(o.counter);
        (p.highest, p.bits) = (w.highest, w.bits);
        if !o.probe && !has_hello {
            p.knows_mine = true;
        }
        change
    }

    /// Seals compact frames for `peer` with `counter`. With the peer's epoch
    /// unknown the payload is a probe (receiver hint 0): only a hello may be in it.
    pub fn seal(&mut self, peer: &Name, plain: &[u8], counter: u64) -> Result<Vec<u8>, String> {
        let p = self.peers.get(peer).cloned().unwrap_or_default();
        self.seal_for(peer, p.epoch, !p.knows_mine || p.epoch == 0, plain, counter)
    }

    /// Seals for one particular store `epoch` of the peer (0: unknown).
    pub fn seal_for(
        &mut self,
        peer: &Name,
        epoch: u64,
        say_epoch: bool,
        plain: &[u8],
        counter: u64,
    ) -> Result<Vec<u8>, String> {
        let header = Header {
            sender: self.me.clone(),
            receiver: peer.clone(),
            sender_epoch: say_epoch.then_some(self.epoch),
            receiver_hint: if epoch == 0 { 0 } else { seal::hint(epoch) },
            counter,
        };
        let mine = self.epoch;
        let key = self
            .key(peer, true, mine, epoch)
            .map_err(|e| format!("cannot seal for {peer}: {e}"))?;
        Ok(seal::seal(key, &header, plain))
    }

    /// Whether a payload for `peer` can carry frames other than a hello.
    pub fn knows_epoch_of(&self, peer: &Name) -> bool {
        self.peers.get(peer).is_some_and(|p| p.epoch != 0)
    }
}
