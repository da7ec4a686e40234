//! The client side of option haggling as a state machine: the I/O layer
//! feeds it the server's bytes and sends whatever it queues, until it says
//! the handshake is [`ClientStep::Done`] (transmission starts) or
//! [`ClientStep::Listed`] (export list collected, ABORT queued).
//!
//! The sequence follows what qemu and libnbd do (protocol digest §3.8):
//! flags → EXTENDED_HEADERS (optional) → STRUCTURED_REPLY (unless extended
//! headers were accepted) → LIST or LIST_META_CONTEXT (optional) →
//! SET_META_CONTEXT (if contexts are wanted and replies are structured) →
//! GO asking for block sizes → EXPORT_NAME if GO is answered ERR_UNSUP.

use bytes::{Buf, BytesMut};

use crate::consts::{
    DEFAULT_MAX_PAYLOAD, MAX_STRING, OPTION_REPLY_HEADER_LEN, cflag, hflag, info, opt, rep, tflag,
};
use crate::handshake::{
    GREETING_LEN, decode_export_name_reply, decode_greeting, export_name_reply_len,
};
use crate::option::{
    Info, InfoRequest, MetaContext, MetaContextRequest, OptionReplyHeader, ServerEntry,
    encode_option, error_message,
};
use crate::reply::ReplyMode;

/// Largest option reply payload the client buffers. Legitimate replies are
/// a few strings of at most 4096 bytes each; anything bigger is hostile.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most replies (exports or contexts) accepted for one option, so a server
/// cannot make the client collect without bound.
pub const MAX_REPLIES_PER_OPTION: usize = 100_000;

/// What the client wants from the handshake.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Export to open (empty = the server's default export).
    pub export: String,
    /// Ask for structured replies (needed for meta contexts and holes).
    pub structured: bool,
    /// Ask for extended headers (64-bit lengths), falling back quietly.
    pub extended: bool,
    /// Meta contexts to select with SET_META_CONTEXT, e.g. `base:allocation`.
    pub meta_contexts: Vec<String>,
    /// List every context the export offers (LIST_META_CONTEXT) before GO.
    pub list_contexts: bool,
    /// Only list the exports (NBD_OPT_LIST), then ABORT.
    pub list_exports: bool,
    /// Start TLS before anything else and give up if the server cannot
    /// (no plaintext fallback: that would be a downgrade).
    pub tls: bool,
}

impl ClientConfig {
    pub fn new(export: impl Into<String>) -> Self {
        ClientConfig {
            export: export.into(),
            structured: true,
            extended: true,
            meta_contexts: Vec::new(),
            list_contexts: false,
            list_exports: false,
            tls: false,
        }
    }
}

/// Block size constraints (NBD_INFO_BLOCK_SIZE), validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSize {
    /// Checks the rules of the spec's "Size constraints" section.
    pub fn validate(minimum: u32, preferred: u32, maximum: u32) -> Result<Self, HandshakeError> {
        let ok = minimum.is_power_of_two()
            && minimum <= 65536
            && preferred.is_power_of_two()
            && preferred >= minimum
            && maximum >= minimum
            && (maximum == u32::MAX || maximum.is_multiple_of(minimum));
        if !ok {
            return Err(HandshakeError::Protocol(format!(
                "invalid block size constraints: minimum {minimum}, preferred {preferred}, maximum {maximum}"
            )));
        }
        Ok(BlockSize {
            minimum,
            preferred,
            maximum,
        })
    }
}

/// What the handshake established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientNegotiated {
    pub size: u64,
    /// Transmission flags of this connection.
    pub flags: u16,
    pub mode: ReplyMode,
    /// Block sizes if the server sent them (we always ask in GO, and so
    /// promise to honour them).
    pub block_size: Option<BlockSize>,
    /// Contexts selected by SET_META_CONTEXT: (id, name).
    pub contexts: Vec<(u32, String)>,
    /// Contexts the export offers, if `list_contexts` was asked for and the
    /// server answered LIST_META_CONTEXT.
    pub available_contexts: Option<Vec<String>>,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Handshake flags of the greeting.
    pub handshake_flags: u16,
    /// The server did not know GO, so EXPORT_NAME was used.
    pub used_export_name: bool,
}

/// What the negotiated flags and sizes allow.
impl ClientNegotiated {
    fn flag(&self, f: u16) -> bool {
        self.flags & f != 0
    }
    pub fn read_only(&self) -> bool {
        self.flag(tflag::READ_ONLY)
    }
    pub fn can_flush(&self) -> bool {
        self.flag(tflag::SEND_FLUSH)
    }
    pub fn can_fua(&self) -> bool {
        self.flag(tflag::SEND_FUA)
    }
    pub fn is_rotational(&self) -> bool {
        self.flag(tflag::ROTATIONAL)
    }
    pub fn can_trim(&self) -> bool {
        self.flag(tflag::SEND_TRIM)
    }
    pub fn can_zero(&self) -> bool {
        self.flag(tflag::SEND_WRITE_ZEROES)
    }
    pub fn can_df(&self) -> bool {
        self.flag(tflag::SEND_DF)
    }
    pub fn can_multi_conn(&self) -> bool {
        self.flag(tflag::CAN_MULTI_CONN)
    }
    pub fn can_cache(&self) -> bool {
        self.flag(tflag::SEND_CACHE)
    }
    pub fn can_fast_zero(&self) -> bool {
        self.flag(tflag::SEND_FAST_ZERO)
    }
    /// Alignment every request must honour (1 when not advertised: a
    /// server that says nothing accepts any alignment).
    pub fn min_block(&self) -> u32 {
        self.block_size.map_or(1, |b| b.minimum)
    }
    pub fn preferred_block(&self) -> u32 {
        self.block_size.map_or(4096, |b| b.preferred)
    }
    /// Largest READ/WRITE payload. Without advice, 32 MiB is what every
    /// server accepts.
    pub fn max_payload(&self) -> u32 {
        self.block_size.map_or(DEFAULT_MAX_PAYLOAD, |b| {
            b.maximum.min(DEFAULT_MAX_PAYLOAD.max(b.preferred))
        })
    }
    /// The id of a selected context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }
    pub fn has_context(&self, name: &str) -> bool {
        self.context_id(name).is_some()
    }
}

/// Why the handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The server broke the protocol; drop the connection.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused an option with an error reply.
    #[error("server refused {option}: {message}")]
    Refused {
        option: &'static str,
        rep_type: u32,
        message: String,
    },
    /// The server closed the connection in reply to EXPORT_NAME, which is
    /// how it says "no such export" without GO.
    #[error("server closed the connection: export '{0}' not available")]
    ExportNameRejected(String),
    /// The handshake already finished or failed.
    #[error("handshake already finished")]
    Finished,
}

/// What the I/O layer must do after `feed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStep {
    /// Send the pending output, read more input (at least `want` bytes
    /// more are useful), feed again.
    NeedMore,
    /// Send the pending output (nothing for GO); transmission starts with the
    /// bytes left in the input buffer.
    Done(Box<ClientNegotiated>),
    /// The export list, answered to `list_exports`; send the pending output
    /// (an ABORT) and close.
    Listed(Vec<ServerEntry>),
    /// STARTTLS was accepted: run the TLS handshake on the stream, then call
    /// [`ClientHandshake::tls_established`] and carry on over TLS. Input
    /// left over belongs to TLS.
    StartTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    /// Waiting for replies to this option.
    Option(u32),
    /// Waiting for the EXPORT_NAME reply of this length.
    ExportName(usize),
    /// STARTTLS acknowledged; the I/O layer runs the TLS handshake.
    TlsPending,
    Finished,
}

pub struct ClientHandshake {
    cfg: ClientConfig,
    state: State,
    out: BytesMut,
    handshake_flags: u16,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    replies: usize,
    exports: Vec<ServerEntry>,
    available: Option<Vec<String>>,
    contexts: Vec<(u32, String)>,
    export: Option<(u64, u16)>,
    block_size: Option<BlockSize>,
    name: Option<String>,
    description: Option<String>,
}

impl ClientHandshake {
    pub fn new(cfg: ClientConfig) -> Self {
        ClientHandshake {
            cfg,
            state: State::Greeting,
            out: BytesMut::with_capacity(256),
            handshake_flags: 0,
            no_zeroes: false,
            structured: false,
            extended: false,
            replies: 0,
            exports: Vec::new(),
            available: None,
            contexts: Vec::new(),
            export: None,
            block_size: None,
            name: None,
            description: None,
        }
    }

    /// Bytes to send to the server.
    pub fn take_output(&mut self) -> BytesMut {
        self.out.split()
    }

    /// True while an EXPORT_NAME reply is awaited: a server that closes the
    /// connection now is rejecting the export, not misbehaving.
    pub fn awaiting_export_name(&self) -> bool {
        matches!(self.state, State::ExportName(_))
    }

    /// TLS is up: negotiate everything again over it (the spec discards
    /// all plaintext state), starting with the output this queues.
    pub fn tls_established(&mut self) -> Result<(), HandshakeError> {
        if self.state != State::TlsPending {
            return Err(HandshakeError::Protocol(
                "TLS established without STARTTLS".into(),
            ));
        }
        self.structured = false;
        self.extended = false;
        self.contexts.clear();
        self.next_after(Some(opt::STARTTLS)).map(|_| ())
    }

    /// The export being opened.
    pub fn export(&self) -> &str {
        &self.cfg.export
    }

    /// Consumes as much of `input` as forms complete messages.
    pub fn feed(&mut self, input: &mut BytesMut) -> Result<ClientStep, HandshakeError> {
        let r = self.feed_inner(input);
        if r.is_err() {
            self.state = State::Finished;
        }
        r
    }

    fn feed_inner(&mut self, input: &mut BytesMut) -> Result<ClientStep, HandshakeError> {
        loop {
            match self.state {
                State::Finished => return Err(HandshakeError::Finished),
                State::TlsPending => return Ok(ClientStep::StartTls),
                State::Greeting => {
                    if input.len() < GREETING_LEN {
                        return Ok(ClientStep::NeedMore);
                    }
                    let flags = decode_greeting(&input[..GREETING_LEN]).map_err(proto)?;
                    input.advance(GREETING_LEN);
                    self.greeting(flags);
                    if let Some(step) = self.next_after(None)? {
                        return Ok(step);
                    }
                }
                State::ExportName(len) => {
                    if input.len() < len {
                        return Ok(ClientStep::NeedMore);
                    }
                    let (size, flags) = decode_export_name_reply(&input[..len]).map_err(proto)?;
                    input.advance(len);
                    self.export = Some((size, flags));
                    return self.done(true);
                }
                State::Option(code) => {
                    if input.len() < OPTION_REPLY_HEADER_LEN {
                        return Ok(ClientStep::NeedMore);
                    }
                    let hdr = OptionReplyHeader::decode(&input[..OPTION_REPLY_HEADER_LEN])
                        .map_err(proto)?;
                    if hdr.option != code {
                        return Err(HandshakeError::Protocol(format!(
                            "reply to option {} while waiting for {}",
                            hdr.option,
                            opt::name(code)
                        )));
                    }
                    if hdr.len > MAX_OPTION_REPLY {
                        return Err(HandshakeError::Protocol(format!(
                            "{}-byte reply to {} is too long",
                            hdr.len,
                            opt::name(code)
                        )));
                    }
                    let total = OPTION_REPLY_HEADER_LEN + hdr.len as usize;
                    if input.len() < total {
                        input.reserve(total - input.len());
                        return Ok(ClientStep::NeedMore);
                    }
                    input.advance(OPTION_REPLY_HEADER_LEN);
                    let data = input.split_to(hdr.len as usize);
                    if let Some(step) = self.reply(code, hdr.rep_type, &data)? {
                        return Ok(step);
                    }
                }
            }
        }
    }

    fn greeting(&mut self, flags: u16) {
        self.handshake_flags = flags;
        let mut cflags = 0;
        if flags & hflag::FIXED_NEWSTYLE != 0 {
            cflags |= cflag::FIXED_NEWSTYLE;
        }
        if flags & hflag::NO_ZEROES != 0 {
            cflags |= cflag::NO_ZEROES;
            self.no_zeroes = true;
        }
        self.out.extend_from_slice(&cflags.to_be_bytes());
    }

    fn fixed(&self) -> bool {
        self.handshake_flags & hflag::FIXED_NEWSTYLE != 0
    }

    /// Sends the option that follows `prev` in the sequence (None = start).
    /// Returns a step when the sequence ends without another reply to wait
    /// for (only EXPORT_NAME on a non-fixed server does that... via state).
    fn next_after(&mut self, prev: Option<u32>) -> Result<Option<ClientStep>, HandshakeError> {
        if self.cfg.tls && prev.is_none() {
            if !self.fixed() {
                return Err(HandshakeError::Protocol(
                    "TLS required but the server does not speak fixed newstyle".into(),
                ));
            }
            self.send_option(opt::STARTTLS);
            return Ok(None);
        }
        if !self.fixed() {
            // Old-style newstyle: EXPORT_NAME is the only legal option.
            if self.cfg.list_exports {
                return Err(HandshakeError::Protocol(
                    "server does not speak fixed newstyle and cannot list exports".into(),
                ));
            }
            self.send_export_name();
            return Ok(None);
        }
        let order = [
            opt::EXTENDED_HEADERS,
            opt::STRUCTURED_REPLY,
            opt::LIST,
            opt::LIST_META_CONTEXT,
            opt::SET_META_CONTEXT,
            opt::GO,
        ];
        let start = match prev {
            None | Some(opt::STARTTLS) => 0,
            Some(p) => order
                .iter()
                .position(|&o| o == p)
                .map_or(order.len(), |i| i + 1),
        };
        for &code in &order[start..] {
            let wanted = match code {
                opt::EXTENDED_HEADERS => self.cfg.extended,
                opt::STRUCTURED_REPLY => self.cfg.structured && !self.extended,
                opt::LIST => self.cfg.list_exports,
                opt::LIST_META_CONTEXT => self.cfg.list_contexts,
                opt::SET_META_CONTEXT => {
                    !self.cfg.meta_contexts.is_empty() && (self.structured || self.extended)
                }
                _ => true,
            };
            if wanted {
                self.send_option(code);
                return Ok(None);
            }
        }
        Ok(None)
    }

    fn send_option(&mut self, code: u32) {
        let mut data = BytesMut::new();
        match code {
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let queries = if code == opt::SET_META_CONTEXT {
                    self.cfg.meta_contexts.clone()
                } else {
                    Vec::new()
                };
                MetaContextRequest {
                    export: self.cfg.export.clone(),
                    queries,
                }
                .encode(&mut data);
            }
            opt::GO => InfoRequest {
                name: self.cfg.export.clone(),
                infos: vec![info::BLOCK_SIZE, info::NAME, info::DESCRIPTION],
            }
            .encode(&mut data),
            _ => {}
        }
        encode_option(&mut self.out, code, &data);
        self.replies = 0;
        self.state = State::Option(code);
    }

    fn send_export_name(&mut self) {
        encode_option(&mut self.out, opt::EXPORT_NAME, self.cfg.export.as_bytes());
        self.state = State::ExportName(export_name_reply_len(self.no_zeroes));
    }

    fn count_reply(&mut self, code: u32) -> Result<(), HandshakeError> {
        self.replies += 1;
        if self.replies > MAX_REPLIES_PER_OPTION {
            return Err(HandshakeError::Protocol(format!(
                "too many replies to {}",
                opt::name(code)
            )));
        }
        Ok(())
    }

    fn reply(
        &mut self,
        code: u32,
        rep_type: u32,
        data: &[u8],
    ) -> Result<Option<ClientStep>, HandshakeError> {
        if rep::is_error(rep_type) {
            return self.error_reply(code, rep_type, data);
        }
        match (code, rep_type) {
            (_, rep::ACK) => {
                if !data.is_empty() {
                    return Err(HandshakeError::Protocol("ACK with a payload".into()));
                }
                self.ack(code)
            }
            (opt::LIST, rep::SERVER) => {
                self.count_reply(code)?;
                self.exports.push(ServerEntry::decode(data).map_err(proto)?);
                Ok(None)
            }
            (opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT, rep::META_CONTEXT) => {
                self.count_reply(code)?;
                let mc = MetaContext::decode(data).map_err(proto)?;
                if code == opt::LIST_META_CONTEXT {
                    self.available.get_or_insert_with(Vec::new).push(mc.name);
                } else {
                    if !self.cfg.meta_contexts.contains(&mc.name) {
                        return Err(HandshakeError::Protocol(format!(
                            "server selected meta context '{}' that was not asked for",
                            mc.name
                        )));
                    }
                    if self.contexts.iter().any(|(id, _)| *id == mc.id) {
                        return Err(HandshakeError::Protocol(format!(
                            "duplicate meta context id {}",
                            mc.id
                        )));
                    }
                    self.contexts.push((mc.id, mc.name));
                }
                Ok(None)
            }
            (opt::GO, rep::INFO) => {
                self.count_reply(code)?;
                match Info::decode(data).map_err(proto)? {
                    Info::Export { size, flags } => self.export = Some((size, flags)),
                    Info::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } => self.block_size = Some(BlockSize::validate(minimum, preferred, maximum)?),
                    Info::Name(n) => self.name = Some(n),
                    Info::Description(d) => self.description = Some(d),
                    // Unknown info types are to be ignored.
                    Info::Unknown(_) => {}
                }
                Ok(None)
            }
            _ => Err(HandshakeError::Protocol(format!(
                "unexpected reply type {} to {}",
                rep::name(rep_type),
                opt::name(code)
            ))),
        }
    }

    fn ack(&mut self, code: u32) -> Result<Option<ClientStep>, HandshakeError> {
        match code {
            opt::STARTTLS => {
                self.state = State::TlsPending;
                return Ok(Some(ClientStep::StartTls));
            }
            opt::EXTENDED_HEADERS => self.extended = true,
            opt::STRUCTURED_REPLY => self.structured = true,
            opt::LIST => {
                encode_option(&mut self.out, opt::ABORT, &[]);
                self.state = State::Finished;
                return Ok(Some(ClientStep::Listed(std::mem::take(&mut self.exports))));
            }
            opt::LIST_META_CONTEXT => {
                self.available.get_or_insert_with(Vec::new);
            }
            opt::GO => return self.done(false).map(Some),
            _ => {}
        }
        self.next_after(Some(code))
    }

    fn error_reply(
        &mut self,
        code: u32,
        rep_type: u32,
        data: &[u8],
    ) -> Result<Option<ClientStep>, HandshakeError> {
        let refused = || HandshakeError::Refused {
            option: opt::name(code),
            rep_type,
            message: error_message(rep_type, &data[..data.len().min(MAX_STRING)]),
        };
        if rep_type == rep::ERR_SHUTDOWN {
            return Err(refused());
        }
        match code {
            // Optional features: carry on without them.
            opt::EXTENDED_HEADERS | opt::STRUCTURED_REPLY | opt::LIST_META_CONTEXT => {
                if code == opt::LIST_META_CONTEXT {
                    self.available = None;
                }
                self.next_after(Some(code))
            }
            opt::SET_META_CONTEXT => {
                // The selection is void after an error.
                self.contexts.clear();
                self.next_after(Some(code))
            }
            opt::GO if rep_type == rep::ERR_UNSUP && !self.extended => {
                // An old server without GO: EXPORT_NAME still works. The
                // info gathered so far (none) is dropped.
                self.export = None;
                self.block_size = None;
                self.send_export_name();
                Ok(None)
            }
            _ => Err(refused()),
        }
    }

    fn done(&mut self, used_export_name: bool) -> Result<ClientStep, HandshakeError> {
        let Some((size, flags)) = self.export else {
            return Err(HandshakeError::Protocol(
                "GO succeeded without NBD_INFO_EXPORT".into(),
            ));
        };
        let mode = if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        };
        if flags & tflag::HAS_FLAGS == 0 {
            return Err(HandshakeError::Protocol(format!(
                "transmission flags {flags:#x} lack HAS_FLAGS"
            )));
        }
        // Contexts chosen for a different export or via EXPORT_NAME are not
        // in force, so block status would fail; forget them.
        let contexts = if used_export_name {
            Vec::new()
        } else {
            std::mem::take(&mut self.contexts)
        };
        self.state = State::Finished;
        Ok(ClientStep::Done(Box::new(ClientNegotiated {
            size,
            flags,
            mode,
            block_size: self.block_size,
            contexts,
            available_contexts: self.available.take(),
            name: self.name.take(),
            description: self.description.take(),
            handshake_flags: self.handshake_flags,
            used_export_name,
        })))
    }
}

fn proto(e: crate::DecodeError) -> HandshakeError {
    HandshakeError::Protocol(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::{IHAVEOPT, OPTION_HEADER_LEN};
    use crate::handshake::{encode_export_name_reply, encode_greeting};
    use crate::option::{OptionHeader, encode_error, encode_reply, encode_reply_with};
    use bytes::BufMut;

    /// A scripted server: decodes the client's options and answers from a
    /// closure, so each test states exactly what the server says.
    struct Script {
        hs: ClientHandshake,
        to_server: BytesMut,
        to_client: BytesMut,
        seen: Vec<u32>,
        flags_read: bool,
    }

    impl Script {
        fn new(cfg: ClientConfig, hflags: u16) -> Self {
            let mut to_client = BytesMut::new();
            encode_greeting(&mut to_client, hflags);
            Script {
                hs: ClientHandshake::new(cfg),
                to_server: BytesMut::new(),
                to_client,
                seen: Vec::new(),
                flags_read: false,
            }
        }

        /// Runs until the client finishes; `server` answers each option.
        fn run(
            &mut self,
            mut server: impl FnMut(u32, &[u8], &mut BytesMut),
        ) -> Result<ClientStep, HandshakeError> {
            for _ in 0..100 {
                // Feed the client one byte at a time to exercise partial input.
                let mut input = BytesMut::new();
                let mut step = ClientStep::NeedMore;
                while !self.to_client.is_empty() {
                    input.put_u8(self.to_client[0]);
                    self.to_client.advance(1);
                    step = self.hs.feed(&mut input)?;
                    if step != ClientStep::NeedMore {
                        break;
                    }
                }
                self.to_client.unsplit(input);
                self.to_server.unsplit(self.hs.take_output());
                if step != ClientStep::NeedMore {
                    return Ok(step);
                }
                if !self.flags_read {
                    assert!(self.to_server.len() >= 4);
                    self.to_server.advance(4);
                    self.flags_read = true;
                }
                while self.to_server.len() >= OPTION_HEADER_LEN {
                    let hdr = OptionHeader::decode(&self.to_server[..OPTION_HEADER_LEN]).unwrap();
                    self.to_server.advance(OPTION_HEADER_LEN);
                    let data = self.to_server.split_to(hdr.len as usize);
                    self.seen.push(hdr.code);
                    server(hdr.code, &data, &mut self.to_client);
                }
            }
            panic!("handshake did not finish");
        }
    }

    fn info_reply(out: &mut BytesMut, code: u32, i: Info) {
        encode_reply_with(out, code, rep::INFO, |b| i.encode(b));
    }

    fn go_ok(out: &mut BytesMut, size: u64, flags: u16) {
        info_reply(out, opt::GO, Info::Export { size, flags });
        info_reply(
            out,
            opt::GO,
            Info::BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 32 << 20,
            },
        );
        encode_reply(out, opt::GO, rep::ACK, &[]);
    }

    fn done(step: ClientStep) -> ClientNegotiated {
        match step {
            ClientStep::Done(n) => *n,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    const FLAGS: u16 = tflag::HAS_FLAGS | tflag::SEND_FLUSH;

    #[test]
    fn modern_server_extended_headers_and_contexts() {
        let mut cfg = ClientConfig::new("disk");
        cfg.meta_contexts = vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()];
        let mut s = Script::new(cfg, hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES);
        let n = done(
            s.run(|code, data, out| match code {
                opt::EXTENDED_HEADERS => encode_reply(out, code, rep::ACK, &[]),
                opt::SET_META_CONTEXT => {
                    let req = MetaContextRequest::decode(data).unwrap();
                    assert_eq!(req.export, "disk");
                    for (i, q) in req.queries.iter().enumerate() {
                        let mc = MetaContext {
                            id: i as u32,
                            name: q.clone(),
                        };
                        encode_reply_with(out, code, rep::META_CONTEXT, |b| mc.encode(b));
                    }
                    encode_reply(out, code, rep::ACK, &[]);
                }
                opt::GO => {
                    let req = InfoRequest::decode(data).unwrap();
                    assert_eq!(req.name, "disk");
                    assert!(req.infos.contains(&info::BLOCK_SIZE));
                    go_ok(out, 1 << 30, FLAGS);
                }
                other => panic!("unexpected option {other}"),
            })
            .unwrap(),
        );
        assert_eq!(
            s.seen,
            vec![opt::EXTENDED_HEADERS, opt::SET_META_CONTEXT, opt::GO]
        );
        assert_eq!(n.mode, ReplyMode::Extended);
        assert_eq!(n.size, 1 << 30);
        assert_eq!(n.flags, FLAGS);
        assert_eq!(n.contexts.len(), 2);
        assert_eq!(n.contexts[1], (1, "qemu:dirty-bitmap:b0".to_string()));
        assert_eq!(n.block_size.unwrap().maximum, 32 << 20);
        assert!(!n.used_export_name);
    }

    #[test]
    fn falls_back_to_structured_replies() {
        let mut cfg = ClientConfig::new("");
        cfg.meta_contexts = vec!["base:allocation".into()];
        let mut s = Script::new(cfg, hflag::FIXED_NEWSTYLE);
        let n = done(
            s.run(|code, _data, out| match code {
                opt::EXTENDED_HEADERS => encode_reply(out, code, rep::ERR_UNSUP, b"no"),
                opt::STRUCTURED_REPLY => encode_reply(out, code, rep::ACK, &[]),
                opt::SET_META_CONTEXT => encode_reply(out, code, rep::ACK, &[]),
                opt::GO => go_ok(out, 512, FLAGS),
                other => panic!("unexpected option {other}"),
            })
            .unwrap(),
        );
        assert_eq!(n.mode, ReplyMode::Structured);
        assert!(n.contexts.is_empty());
    }

    #[test]
    fn old_server_falls_back_to_export_name() {
        let cfg = ClientConfig::new("x");
        // No NO_ZEROES: the EXPORT_NAME reply carries 124 zero bytes.
        let mut s = Script::new(cfg, hflag::FIXED_NEWSTYLE);
        let n = done(
            s.run(|code, data, out| match code {
                opt::EXTENDED_HEADERS | opt::STRUCTURED_REPLY | opt::GO => {
                    encode_reply(out, code, rep::ERR_UNSUP, &[])
                }
                opt::EXPORT_NAME => {
                    assert_eq!(data, b"x");
                    encode_export_name_reply(out, 4096, FLAGS, false);
                }
                other => panic!("unexpected option {other}"),
            })
            .unwrap(),
        );
        assert!(n.used_export_name);
        assert_eq!(n.mode, ReplyMode::Simple);
        assert_eq!((n.size, n.flags), (4096, FLAGS));
        assert!(s.to_client.is_empty(), "all 134 bytes consumed");
    }

    #[test]
    fn non_fixed_server_gets_export_name_only() {
        let mut s = Script::new(ClientConfig::new("a"), 0);
        let n = done(
            s.run(|code, _, out| {
                assert_eq!(code, opt::EXPORT_NAME);
                encode_export_name_reply(out, 1024, FLAGS, false);
            })
            .unwrap(),
        );
        assert_eq!(s.seen, vec![opt::EXPORT_NAME]);
        assert_eq!(n.size, 1024);
    }

    #[test]
    fn lists_exports_then_aborts() {
        let mut cfg = ClientConfig::new("");
        cfg.list_exports = true;
        cfg.extended = false;
        cfg.structured = false;
        let mut s = Script::new(cfg, hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES);
        let step = s
            .run(|code, _, out| {
                assert_eq!(code, opt::LIST);
                for name in ["a", "b"] {
                    let e = ServerEntry {
                        name: name.into(),
                        description: format!("disk {name}"),
                    };
                    encode_reply_with(out, code, rep::SERVER, |b| e.encode(b));
                }
                encode_reply(out, code, rep::ACK, &[]);
            })
            .unwrap();
        let ClientStep::Listed(list) = step else {
            panic!("expected a list")
        };
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].description, "disk b");
        // The ABORT is queued for sending.
        assert_eq!(&s.to_server[..8], &IHAVEOPT.to_be_bytes());
    }

    #[test]
    fn go_error_is_reported() {
        let mut s = Script::new(ClientConfig::new("nope"), hflag::FIXED_NEWSTYLE);
        let err = s
            .run(|code, _, out| match code {
                opt::GO => encode_reply(out, code, rep::ERR_UNKNOWN, b"no such export"),
                _ => encode_reply(out, code, rep::ACK, &[]),
            })
            .unwrap_err();
        match err {
            HandshakeError::Refused {
                option, message, ..
            } => {
                assert_eq!(option, "GO");
                assert!(message.contains("no such export"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn list_meta_context_collects_available() {
        let mut cfg = ClientConfig::new("");
        cfg.list_contexts = true;
        let mut s = Script::new(cfg, hflag::FIXED_NEWSTYLE);
        let n = done(
            s.run(|code, _, out| match code {
                opt::LIST_META_CONTEXT => {
                    for name in ["base:allocation", "qemu:dirty-bitmap:b"] {
                        let mc = MetaContext {
                            id: 0,
                            name: name.into(),
                        };
                        encode_reply_with(out, code, rep::META_CONTEXT, |b| mc.encode(b));
                    }
                    encode_reply(out, code, rep::ACK, &[]);
                }
                opt::GO => go_ok(out, 1, FLAGS),
                _ => encode_reply(out, code, rep::ACK, &[]),
            })
            .unwrap(),
        );
        assert_eq!(n.available_contexts.unwrap().len(), 2);
    }

    #[test]
    fn rejects_garbage_and_hostile_replies() {
        // Wrong magic in the greeting.
        let mut hs = ClientHandshake::new(ClientConfig::new(""));
        let mut input = BytesMut::from(&[0xffu8; 18][..]);
        assert!(matches!(
            hs.feed(&mut input),
            Err(HandshakeError::Protocol(_))
        ));

        // Oversized option reply: refused before buffering it.
        let mut s = Script::new(ClientConfig::new(""), hflag::FIXED_NEWSTYLE);
        let err = s
            .run(|code, _, out| {
                out.put_u64(crate::consts::OPT_REPLY_MAGIC);
                out.put_u32(code);
                out.put_u32(rep::ACK);
                out.put_u32(u32::MAX);
            })
            .unwrap_err();
        assert!(
            matches!(err, HandshakeError::Protocol(ref m) if m.contains("too long")),
            "{err}"
        );

        // A reply to an option that was not sent.
        let mut s = Script::new(ClientConfig::new(""), hflag::FIXED_NEWSTYLE);
        let err = s
            .run(|_, _, out| encode_reply(out, opt::LIST, rep::ACK, &[]))
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Protocol(_)));

        // GO acknowledged without export info.
        let mut s = Script::new(ClientConfig::new(""), hflag::FIXED_NEWSTYLE);
        let err = s
            .run(|code, _, out| encode_reply(out, code, rep::ACK, &[]))
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Protocol(ref m) if m.contains("NBD_INFO_EXPORT")));

        // Invalid block sizes.
        let mut s = Script::new(ClientConfig::new(""), hflag::FIXED_NEWSTYLE);
        let err = s
            .run(|code, _, out| {
                if code == opt::GO {
                    info_reply(
                        out,
                        code,
                        Info::BlockSize {
                            minimum: 3,
                            preferred: 4096,
                            maximum: 1 << 20,
                        },
                    );
                }
                encode_reply(out, code, rep::ACK, &[]);
            })
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Protocol(ref m) if m.contains("block size")));

        // After an error the machine refuses further input.
        assert_eq!(
            s.hs.feed(&mut BytesMut::new()),
            Err(HandshakeError::Finished)
        );
    }

    #[test]
    fn tls_goes_first_and_everything_is_renegotiated_after_it() {
        let mut cfg = ClientConfig::new("disk");
        cfg.tls = true;
        cfg.meta_contexts = vec!["base:allocation".into()];
        let mut sc = Script::new(cfg, hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES);
        let step = sc
            .run(|code, _, out| {
                assert_eq!(code, opt::STARTTLS, "STARTTLS must be the first option");
                encode_reply(out, code, rep::ACK, &[]);
            })
            .unwrap();
        assert_eq!(step, ClientStep::StartTls);
        assert_eq!(sc.seen, vec![opt::STARTTLS]);
        // Over TLS the options start again from the top.
        sc.hs.tls_established().unwrap();
        let step = sc
            .run(|code, data, out| match code {
                opt::EXTENDED_HEADERS => encode_reply(out, code, rep::ACK, &[]),
                opt::SET_META_CONTEXT => {
                    let req = MetaContextRequest::decode(data).unwrap();
                    assert_eq!(req.queries, vec!["base:allocation".to_string()]);
                    encode_reply_with(out, code, rep::META_CONTEXT, |b| {
                        MetaContext {
                            id: 5,
                            name: "base:allocation".into(),
                        }
                        .encode(b)
                    });
                    encode_reply(out, code, rep::ACK, &[]);
                }
                opt::GO => go_ok(out, 1 << 20, tflag::HAS_FLAGS),
                other => panic!("unexpected option {other}"),
            })
            .unwrap();
        let n = done(step);
        assert_eq!(n.mode, ReplyMode::Extended);
        assert_eq!(n.contexts, vec![(5, "base:allocation".to_string())]);
    }

    #[test]
    fn tls_refused_or_impossible_is_an_error_not_a_downgrade() {
        let mut cfg = ClientConfig::new("disk");
        cfg.tls = true;
        let mut sc = Script::new(cfg.clone(), hflag::FIXED_NEWSTYLE);
        let err = sc
            .run(|code, _, out| encode_error(out, code, rep::ERR_POLICY, "TLS not configured"))
            .unwrap_err();
        assert!(err.to_string().contains("STARTTLS"), "{err}");
        assert_eq!(sc.seen, vec![opt::STARTTLS]);
        let mut sc = Script::new(cfg, 0);
        let err = sc
            .run(|_, _, _| panic!("no option may be sent"))
            .unwrap_err();
        assert!(err.to_string().contains("fixed newstyle"), "{err}");
    }
}
