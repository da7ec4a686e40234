//! The answer to a client the server has no room for. A bare close leaves
//! the client guessing (a network fault? a crash?); the protocol's way to
//! turn a client away is to answer its options with an error that says
//! why, so every option gets ERR_POLICY and the message. The caller bounds
//! the time (and the number of clients refused at once); the memory is a
//! few small buffers.

use bytes::BytesMut;
use nbd_proto::consts::{MAX_STRING, cflag, hflag, opt, rep};
use nbd_proto::handshake::encode_greeting;
use nbd_proto::option::{OptionHeader, encode_error, encode_reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Options a refused client may send before it is dropped: a client tries
/// a few (STARTTLS, STRUCTURED_REPLY, GO...) before it gives up.
const MAX_OPTIONS: usize = 8;

/// Option data a refused client may send: a GO with the longest name and a
/// few info requests.
const MAX_OPTION_DATA: u32 = MAX_STRING as u32 + 64;

/// Greets the client and answers its options with `message` until it
/// aborts, sends EXPORT_NAME (which has no error reply: the client is
/// dropped), misbehaves or has sent `MAX_OPTIONS`.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    message: &str,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(64 + message.len());
    encode_greeting(&mut out, hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES);
    s.write_all(&out).await?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).await?;
    if u32::from_be_bytes(flags) & cflag::FIXED_NEWSTYLE == 0 {
        // Without fixed newstyle an option error is not understood.
        return Ok(());
    }
    let mut header = [0u8; 16];
    for _ in 0..MAX_OPTIONS {
        s.read_exact(&mut header).await?;
        let Ok(option) = OptionHeader::decode(&header) else {
            return Ok(());
        };
        if option.len > MAX_OPTION_DATA {
            return Ok(());
        }
        let data = (&mut s).take(option.len.into());
        tokio::io::copy(&mut { data }, &mut tokio::io::sink()).await?;
        out.clear();
        match option.code {
            opt::EXPORT_NAME => return Ok(()),
            opt::ABORT => {
                encode_reply(&mut out, opt::ABORT, rep::ACK, &[]);
                s.write_all(&out).await?;
                return s.flush().await;
            }
            code => encode_error(&mut out, code, rep::ERR_POLICY, message),
        }
        s.write_all(&out).await?;
        s.flush().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use nbd_proto::consts::{IHAVEOPT, NBDMAGIC, OPT_REPLY_MAGIC};
    use tokio::io::DuplexStream;
    use tokio::task::JoinHandle;

    use super::*;

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// A refusal of `message` and a client past the greeting.
    async fn refused(message: &'static str) -> (JoinHandle<std::io::Result<()>>, DuplexStream) {
        let (server, mut client) = tokio::io::duplex(4096);
        let task = tokio::spawn(refuse(server, message));
        let mut greeting = [0u8; 18];
        client.read_exact(&mut greeting).await.unwrap();
        assert_eq!(greeting[..8], NBDMAGIC.to_be_bytes());
        client.write_all(&1u32.to_be_bytes()).await.unwrap();
        (task, client)
    }

    #[tokio::test]
    async fn options_get_the_reason_then_abort_is_acknowledged() {
        let (task, mut client) = refused("too many connections").await;
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk\0\0");
        client.write_all(&option(opt::GO, &go)).await.unwrap();
        let mut reply = [0u8; 20];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[..8], OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(reply[8..12], opt::GO.to_be_bytes());
        assert_eq!(reply[12..16], rep::ERR_POLICY.to_be_bytes());
        let mut text = vec![0u8; u32::from_be_bytes(reply[16..20].try_into().unwrap()) as usize];
        client.read_exact(&mut text).await.unwrap();
        assert_eq!(text, b"too many connections");
        client.write_all(&option(opt::ABORT, &[])).await.unwrap();
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[12..16], rep::ACK.to_be_bytes());
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_oversized_option_ends_the_refusal() {
        let (task, mut client) = refused("busy").await;
        let mut big = option(opt::GO, &[]);
        big[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        client.write_all(&big).await.unwrap();
        task.await.unwrap().unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "answered an oversized option: {rest:?}");
    }
}
