//! Every number the NBD protocol puts on the wire (NBD spec doc/proto.md,
//! plus the extended-headers extension that qemu and libnbd ship).

/// "NBDMAGIC": the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle greeting and prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Second magic of the obsolete oldstyle greeting.
pub const CLISERV_MAGIC: u64 = 0x00_4202_8186_1253;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server to client, 16 bit).
pub mod hflag {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client to server, 32 bit).
pub mod cflag {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Option codes (NBD_OPT_*).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;

    /// A name for logs.
    pub fn name(code: u32) -> &'static str {
        match code {
            EXPORT_NAME => "EXPORT_NAME",
            ABORT => "ABORT",
            LIST => "LIST",
            PEEK_EXPORT => "PEEK_EXPORT",
            STARTTLS => "STARTTLS",
            INFO => "INFO",
            GO => "GO",
            STRUCTURED_REPLY => "STRUCTURED_REPLY",
            LIST_META_CONTEXT => "LIST_META_CONTEXT",
            SET_META_CONTEXT => "SET_META_CONTEXT",
            EXTENDED_HEADERS => "EXTENDED_HEADERS",
            _ => "unknown",
        }
    }
}

/// Option reply types (NBD_REP_*).
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT | 10;

    pub fn is_error(rep: u32) -> bool {
        rep & ERR_BIT != 0
    }

    /// A name for error messages.
    pub fn name(rep: u32) -> &'static str {
        match rep {
            ACK => "ACK",
            SERVER => "SERVER",
            INFO => "INFO",
            META_CONTEXT => "META_CONTEXT",
            ERR_UNSUP => "ERR_UNSUP",
            ERR_POLICY => "ERR_POLICY",
            ERR_INVALID => "ERR_INVALID",
            ERR_PLATFORM => "ERR_PLATFORM",
            ERR_TLS_REQD => "ERR_TLS_REQD",
            ERR_UNKNOWN => "ERR_UNKNOWN",
            ERR_SHUTDOWN => "ERR_SHUTDOWN",
            ERR_BLOCK_SIZE_REQD => "ERR_BLOCK_SIZE_REQD",
            ERR_TOO_BIG => "ERR_TOO_BIG",
            ERR_EXT_HEADER_REQD => "ERR_EXT_HEADER_REQD",
            _ => "unknown",
        }
    }
}

/// Information types inside NBD_REP_INFO (NBD_INFO_*).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (per export, per connection).
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
    pub const RESIZE: u16 = 8;

    pub fn name(code: u16) -> &'static str {
        match code {
            READ => "READ",
            WRITE => "WRITE",
            DISC => "DISC",
            FLUSH => "FLUSH",
            TRIM => "TRIM",
            CACHE => "CACHE",
            WRITE_ZEROES => "WRITE_ZEROES",
            BLOCK_STATUS => "BLOCK_STATUS",
            RESIZE => "RESIZE",
            _ => "unknown",
        }
    }
}

/// Command flags.
pub mod cmdflag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured and extended reply flags.
pub mod replyflag {
    pub const DONE: u16 = 1 << 0;
}

/// Chunk types of structured and extended replies.
pub mod chunk {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const BLOCK_STATUS_EXT: u16 = 6;
    pub const ERROR_BIT: u16 = 1 << 15;
    pub const ERROR: u16 = ERROR_BIT | 1;
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// Error values of replies (not the host's errno values).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;

    pub fn name(code: u32) -> &'static str {
        match code {
            0 => "success",
            EPERM => "EPERM",
            EIO => "EIO",
            ENOMEM => "ENOMEM",
            EINVAL => "EINVAL",
            ENOSPC => "ENOSPC",
            EOVERFLOW => "EOVERFLOW",
            ENOTSUP => "ENOTSUP",
            ESHUTDOWN => "ESHUTDOWN",
            _ => "unknown error",
        }
    }
}

/// Status bits of the `base:allocation` context.
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
    /// Bit 0 of a `qemu:dirty-bitmap:NAME` context.
    pub const DIRTY: u32 = 1 << 0;
}

/// The one context every server should offer.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of qemu's dirty bitmap contexts.
pub const QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Longest string the protocol allows (names, descriptions, messages).
pub const MAX_STRING: usize = 4096;
/// Payload limit clients may assume when the server does not say (32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Size of an option header (client to server).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
