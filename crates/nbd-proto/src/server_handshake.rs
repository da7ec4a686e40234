//! The server side of option haggling as a state machine: bytes in, bytes
//! out, and a [`Step`] telling the I/O layer what to do next (wait for more
//! input, upgrade to TLS, start transmission, or hang up).

use bytes::{Buf, BytesMut};

use crate::consts::{
    BASE_ALLOCATION, MAX_STRING, OPTION_HEADER_LEN, cflag, hflag, info, opt, rep, tflag,
};
use crate::handshake::{encode_export_name_reply, encode_greeting};
use crate::option::{
    Info, InfoRequest, MetaContext, MetaContextRequest, OptionHeader, ServerEntry, encode_error,
    encode_reply, encode_reply_with,
};
use crate::reply::ReplyMode;

/// Whether and how the server offers TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS configured: STARTTLS is refused.
    #[default]
    Off,
    /// TLS offered; exports that require it say so individually.
    Allow,
    /// Every option but STARTTLS and ABORT needs TLS first.
    Require,
}

#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    pub tls: TlsMode,
    /// Options longer than this are skipped without being buffered and
    /// answered with ERR_TOO_BIG (or ERR_UNSUP if the option is unknown).
    pub max_option_len: u32,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            tls: TlsMode::Off,
            max_option_len: 64 * 1024,
        }
    }
}

/// What the server knows of the client, for export policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    pub tls: bool,
    /// Names from the client certificate (subject CN, SAN DNS names).
    pub identities: Vec<String>,
}

/// Result of looking an export up on behalf of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<E> {
    Found(E),
    Unknown,
    TlsRequired,
    Denied(String),
}

/// What the handshake advertises about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name (what LIST shows).
    pub name: String,
    pub description: String,
    pub size: u64,
    /// Transmission flags of the export itself; HAS_FLAGS and the
    /// per-connection flags (DF) are added by the handshake.
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    /// Meta contexts the export offers, in id order.
    pub contexts: Vec<String>,
}

/// The server's exports, as the handshake sees them.
pub trait Catalog {
    type Export: Clone;
    fn lookup(&self, name: &str, peer: &Peer) -> Lookup<Self::Export>;
    fn info(&self, export: &Self::Export) -> ExportInfo;
    /// Exports this peer may see in LIST.
    fn list(&self, peer: &Peer) -> Vec<ServerEntry>;
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone)]
pub struct Negotiated<E> {
    pub export: E,
    pub info: ExportInfo,
    pub mode: ReplyMode,
    /// Transmission flags sent to this client.
    pub flags: u16,
    /// Selected meta contexts: (id, name). Ids index `info.contexts`.
    pub contexts: Vec<(u32, String)>,
    /// The client asked for block sizes in GO and so promised to honour them.
    pub block_size_promised: bool,
}

/// What the I/O layer must do after `feed`.
#[derive(Debug)]
pub enum Step<E> {
    /// Send the pending output, read more input, feed again.
    NeedMore,
    /// Send the pending output, then run the TLS handshake on the same
    /// stream and call [`ServerHandshake::tls_established`]. Input left in the
    /// buffer belongs to the TLS layer.
    StartTls,
    /// Send the pending output, then close (the client aborted).
    Abort,
    /// Send the pending output; transmission starts.
    Done(Box<Negotiated<E>>),
    /// Hard disconnect: protocol violation or an EXPORT_NAME that cannot be
    /// answered. Pending output may still be sent.
    Close(String),
}

#[derive(Debug, Clone, Copy)]
enum State {
    ClientFlags,
    Header,
    Data { code: u32, len: usize },
    Skip { code: u32, remaining: u64 },
    Finished,
}

pub struct ServerHandshake {
    cfg: HandshakeConfig,
    state: State,
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Canonical export name and contexts of the last SET_META_CONTEXT.
    selected: Option<(String, Vec<(u32, String)>)>,
    peer: Peer,
    out: BytesMut,
}

/// Options longer than this are not worth reading through: the client is
/// broken or hostile, and qemu hangs up on them too.
pub const MAX_SKIPPABLE_OPTION: u32 = 32 << 20;

const HANDSHAKE_FLAGS: u16 = hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES;

impl ServerHandshake {
    /// A new handshake; the greeting is already queued as output.
    pub fn new(cfg: HandshakeConfig) -> Self {
        let mut out = BytesMut::with_capacity(256);
        encode_greeting(&mut out, HANDSHAKE_FLAGS);
        ServerHandshake {
            cfg,
            state: State::ClientFlags,
            fixed_newstyle: false,
            no_zeroes: false,
            structured: false,
            extended: false,
            selected: None,
            peer: Peer::default(),
            out,
        }
    }

    /// Bytes to send to the client.
    pub fn take_output(&mut self) -> BytesMut {
        self.out.split()
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// TLS is up: record who the client is and forget everything negotiated
    /// in plaintext, as the spec requires.
    pub fn tls_established(&mut self, identities: Vec<String>) {
        self.peer = Peer {
            tls: true,
            identities,
        };
        self.structured = false;
        self.extended = false;
        self.selected = None;
    }

    /// Consumes as much of `input` as forms complete messages.
    pub fn feed<C: Catalog>(&mut self, input: &mut BytesMut, catalog: &C) -> Step<C::Export> {
        loop {
            match self.state {
                State::Finished => return Step::Close("handshake already finished".into()),
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Step::NeedMore;
                    }
                    let flags = input.get_u32();
                    let known = cflag::FIXED_NEWSTYLE | cflag::NO_ZEROES;
                    if flags & !known != 0 {
                        return self.close(format!("unknown client flags {flags:#x}"));
                    }
                    self.fixed_newstyle = flags & cflag::FIXED_NEWSTYLE != 0;
                    self.no_zeroes = flags & cflag::NO_ZEROES != 0;
                    self.state = State::Header;
                }
                State::Header => {
                    if input.len() < OPTION_HEADER_LEN {
                        return Step::NeedMore;
                    }
                    let hdr = match OptionHeader::decode(&input[..OPTION_HEADER_LEN]) {
                        Ok(h) => h,
                        Err(e) => return self.close(format!("bad option header: {e}")),
                    };
                    input.advance(OPTION_HEADER_LEN);
                    if !self.fixed_newstyle && hdr.code != opt::EXPORT_NAME {
                        return self.close(
                            "option other than EXPORT_NAME from a non-fixed-newstyle client".into(),
                        );
                    }
                    if hdr.len > MAX_SKIPPABLE_OPTION {
                        return self.close(format!(
                            "option {} of {} bytes",
                            opt::name(hdr.code),
                            hdr.len
                        ));
                    }
                    self.state = if hdr.len > self.cfg.max_option_len {
                        State::Skip {
                            code: hdr.code,
                            remaining: hdr.len.into(),
                        }
                    } else {
                        State::Data {
                            code: hdr.code,
                            len: hdr.len as usize,
                        }
                    };
                }
                State::Skip { code, remaining } => {
                    let n = remaining.min(input.len() as u64);
                    input.advance(n as usize);
                    let remaining = remaining - n;
                    if remaining > 0 {
                        self.state = State::Skip { code, remaining };
                        return Step::NeedMore;
                    }
                    self.state = State::Header;
                    if let Some(step) = self.oversized(code) {
                        return step;
                    }
                }
                State::Data { code, len } => {
                    if input.len() < len {
                        input.reserve(len - input.len());
                        return Step::NeedMore;
                    }
                    let data = input.split_to(len);
                    self.state = State::Header;
                    if let Some(step) = self.option(code, &data, catalog) {
                        return step;
                    }
                }
            }
        }
    }

    fn close<E>(&mut self, why: String) -> Step<E> {
        self.state = State::Finished;
        Step::Close(why)
    }

    fn tls_gate(&self) -> bool {
        self.cfg.tls == TlsMode::Require && !self.peer.tls
    }

    fn oversized<E>(&mut self, code: u32) -> Option<Step<E>> {
        match code {
            opt::EXPORT_NAME => Some(self.close("EXPORT_NAME longer than any export name".into())),
            _ if self.tls_gate() && code != opt::ABORT && code != opt::STARTTLS => {
                encode_error(&mut self.out, code, rep::ERR_TLS_REQD, "TLS is required");
                None
            }
            opt::ABORT => {
                encode_reply(&mut self.out, code, rep::ACK, &[]);
                self.state = State::Finished;
                Some(Step::Abort)
            }
            opt::LIST | opt::STARTTLS | opt::STRUCTURED_REPLY | opt::EXTENDED_HEADERS => {
                encode_error(
                    &mut self.out,
                    code,
                    rep::ERR_INVALID,
                    "option takes no data",
                );
                None
            }
            opt::INFO | opt::GO | opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                encode_error(&mut self.out, code, rep::ERR_TOO_BIG, "option too long");
                None
            }
            _ => {
                encode_error(&mut self.out, code, rep::ERR_UNSUP, "unknown option");
                None
            }
        }
    }

    fn option<C: Catalog>(
        &mut self,
        code: u32,
        data: &[u8],
        catalog: &C,
    ) -> Option<Step<C::Export>> {
        if self.tls_gate() {
            match code {
                opt::ABORT | opt::STARTTLS => {}
                opt::EXPORT_NAME => {
                    return Some(self.close("EXPORT_NAME before TLS on a TLS-only server".into()));
                }
                _ => {
                    encode_error(&mut self.out, code, rep::ERR_TLS_REQD, "TLS is required");
                    return None;
                }
            }
        }
        match code {
            opt::EXPORT_NAME => Some(self.export_name(data, catalog)),
            opt::ABORT => {
                encode_reply(&mut self.out, code, rep::ACK, &[]);
                self.state = State::Finished;
                Some(Step::Abort)
            }
            opt::LIST => {
                if !data.is_empty() {
                    encode_error(&mut self.out, code, rep::ERR_INVALID, "LIST takes no data");
                    return None;
                }
                for entry in catalog.list(&self.peer) {
                    encode_reply_with(&mut self.out, code, rep::SERVER, |b| entry.encode(b));
                }
                encode_reply(&mut self.out, code, rep::ACK, &[]);
                None
            }
            opt::STARTTLS => self.starttls(data),
            opt::INFO | opt::GO => self.info_or_go(code, data, catalog),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    encode_error(
                        &mut self.out,
                        code,
                        rep::ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    );
                } else if self.extended {
                    encode_error(
                        &mut self.out,
                        code,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else if self.structured {
                    encode_error(
                        &mut self.out,
                        code,
                        rep::ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    self.structured = true;
                    encode_reply(&mut self.out, code, rep::ACK, &[]);
                }
                None
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    encode_error(
                        &mut self.out,
                        code,
                        rep::ERR_INVALID,
                        "EXTENDED_HEADERS takes no data",
                    );
                } else if self.extended {
                    encode_error(
                        &mut self.out,
                        code,
                        rep::ERR_INVALID,
                        "extended headers already negotiated",
                    );
                } else {
                    self.extended = true;
                    encode_reply(&mut self.out, code, rep::ACK, &[]);
                }
                None
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(code, data, catalog);
                None
            }
            _ => {
                encode_error(&mut self.out, code, rep::ERR_UNSUP, "unknown option");
                None
            }
        }
    }

    fn starttls<E>(&mut self, data: &[u8]) -> Option<Step<E>> {
        let code = opt::STARTTLS;
        if !data.is_empty() {
            encode_error(
                &mut self.out,
                code,
                rep::ERR_INVALID,
                "STARTTLS takes no data",
            );
        } else if self.peer.tls {
            encode_error(&mut self.out, code, rep::ERR_INVALID, "TLS already active");
        } else if self.cfg.tls == TlsMode::Off {
            encode_error(&mut self.out, code, rep::ERR_POLICY, "TLS not configured");
        } else {
            encode_reply(&mut self.out, code, rep::ACK, &[]);
            return Some(Step::StartTls);
        }
        None
    }

    fn lookup_reply<C: Catalog>(
        &mut self,
        code: u32,
        name: &str,
        catalog: &C,
    ) -> Option<C::Export> {
        match catalog.lookup(name, &self.peer) {
            Lookup::Found(e) => Some(e),
            Lookup::Unknown => {
                encode_error(
                    &mut self.out,
                    code,
                    rep::ERR_UNKNOWN,
                    &format!("export '{name}' not available"),
                );
                None
            }
            Lookup::TlsRequired => {
                encode_error(
                    &mut self.out,
                    code,
                    rep::ERR_TLS_REQD,
                    "export requires TLS",
                );
                None
            }
            Lookup::Denied(why) => {
                encode_error(&mut self.out, code, rep::ERR_POLICY, &why);
                None
            }
        }
    }

    fn flags_for(&self, info: &ExportInfo) -> u16 {
        let mut flags = info.flags | tflag::HAS_FLAGS;
        if self.structured || self.extended {
            flags |= tflag::SEND_DF;
        } else {
            flags &= !tflag::SEND_DF;
        }
        flags & !tflag::BLOCK_STATUS_PAYLOAD
    }

    fn mode(&self) -> ReplyMode {
        if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }

    fn contexts_for(&self, canonical: &str) -> Vec<(u32, String)> {
        match &self.selected {
            Some((name, ctx)) if name == canonical => ctx.clone(),
            _ => Vec::new(),
        }
    }

    fn export_name<C: Catalog>(&mut self, data: &[u8], catalog: &C) -> Step<C::Export> {
        if self.extended {
            return self.close("EXPORT_NAME after extended headers".into());
        }
        let name = match crate::Reader::new(data).string(data.len()) {
            Ok(n) => n,
            Err(e) => return self.close(format!("bad export name: {e}")),
        };
        let export = match catalog.lookup(&name, &self.peer) {
            Lookup::Found(e) => e,
            Lookup::Unknown => return self.close(format!("EXPORT_NAME '{name}': no such export")),
            Lookup::TlsRequired => return self.close(format!("EXPORT_NAME '{name}' requires TLS")),
            Lookup::Denied(why) => {
                return self.close(format!("EXPORT_NAME '{name}' denied: {why}"));
            }
        };
        let info = catalog.info(&export);
        let flags = self.flags_for(&info);
        let no_zeroes = self.no_zeroes;
        encode_export_name_reply(&mut self.out, info.size, flags, no_zeroes);
        self.finish(export, info, flags, false)
    }

    fn finish<E>(&mut self, export: E, info: ExportInfo, flags: u16, promised: bool) -> Step<E> {
        self.state = State::Finished;
        let contexts = self.contexts_for(&info.name);
        Step::Done(Box::new(Negotiated {
            export,
            contexts,
            mode: self.mode(),
            flags,
            info,
            block_size_promised: promised,
        }))
    }

    fn info_or_go<C: Catalog>(
        &mut self,
        code: u32,
        data: &[u8],
        catalog: &C,
    ) -> Option<Step<C::Export>> {
        let req = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                encode_error(&mut self.out, code, rep::ERR_INVALID, &e.to_string());
                return None;
            }
        };
        let export = self.lookup_reply(code, &req.name, catalog)?;
        let info = catalog.info(&export);
        let flags = self.flags_for(&info);
        let reply =
            |out: &mut BytesMut, i: Info| encode_reply_with(out, code, rep::INFO, |b| i.encode(b));
        reply(
            &mut self.out,
            Info::Export {
                size: info.size,
                flags,
            },
        );
        if req.infos.contains(&info::NAME) {
            reply(&mut self.out, Info::Name(info.name.clone()));
        }
        if req.infos.contains(&info::DESCRIPTION) || !info.description.is_empty() {
            reply(&mut self.out, Info::Description(info.description.clone()));
        }
        reply(
            &mut self.out,
            Info::BlockSize {
                minimum: info.min_block,
                preferred: info.preferred_block,
                maximum: info.max_payload,
            },
        );
        encode_reply(&mut self.out, code, rep::ACK, &[]);
        if code == opt::GO {
            let promised = req.infos.contains(&info::BLOCK_SIZE);
            return Some(self.finish(export, info, flags, promised));
        }
        None
    }

    fn meta_context<C: Catalog>(&mut self, code: u32, data: &[u8], catalog: &C) {
        let set = code == opt::SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.selected = None;
            if !self.structured && !self.extended {
                encode_error(
                    &mut self.out,
                    code,
                    rep::ERR_INVALID,
                    "structured replies not negotiated",
                );
                return;
            }
        }
        let req = match MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                encode_error(&mut self.out, code, rep::ERR_INVALID, &e.to_string());
                return;
            }
        };
        let Some(export) = self.lookup_reply(code, &req.export, catalog) else {
            return;
        };
        let info = catalog.info(&export);
        let matched = match_contexts(&info.contexts, &req.queries, set);
        for (id, name) in &matched {
            let mc = MetaContext {
                id: if set { *id } else { 0 },
                name: name.clone(),
            };
            encode_reply_with(&mut self.out, code, rep::META_CONTEXT, |b| mc.encode(b));
        }
        encode_reply(&mut self.out, code, rep::ACK, &[]);
        if set {
            self.selected = Some((info.name, matched));
        }
    }
}

/// Resolves meta context queries against an export's contexts. In LIST, no
/// query means everything and a query ending in ':' is a prefix wildcard
/// (`base:`, `qemu:`, `qemu:dirty-bitmap:`); SET takes exact names only.
/// Unknown namespaces and names are ignored, as the spec requires.
pub fn match_contexts(contexts: &[String], queries: &[String], set: bool) -> Vec<(u32, String)> {
    let all = || {
        contexts
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u32, c.clone()))
    };
    if queries.is_empty() {
        return if set { Vec::new() } else { all().collect() };
    }
    let mut out: Vec<(u32, String)> = Vec::new();
    for q in queries {
        if q.len() > MAX_STRING {
            continue;
        }
        for (id, name) in all() {
            let hit = if !set && q.ends_with(':') {
                name.starts_with(q.as_str())
            } else {
                name == *q
            };
            if hit && !out.iter().any(|(i, _)| *i == id) {
                out.push((id, name));
            }
        }
    }
    out
}

/// The contexts every file-backed export offers.
pub fn default_contexts() -> Vec<String> {
    vec![BASE_ALLOCATION.to_string()]
}
