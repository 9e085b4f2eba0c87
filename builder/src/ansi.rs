//! Removing terminal escape sequences from Nix's output: Nix colours its error messages even
//! when they go to a pipe, and a log read in a browser or a CI page shows the codes as noise.
//! The stripper keeps its state between chunks, so a sequence cut across two reads of the pipe is
//! still removed whole.

/// Where the stripper is within an escape sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Ordinary text.
    #[default]
    Text,
    /// After ESC.
    Escape,
    /// Inside a control sequence (`ESC [`), until its final byte.
    ControlSequence,
    /// Inside an operating-system command (`ESC ]`), until BEL or `ESC \`.
    OperatingSystemCommand,
    /// After ESC inside an operating-system command.
    OperatingSystemCommandEscape,
}

/// Strips escape sequences from a stream of chunks.
#[derive(Debug, Default)]
pub struct AnsiStripper {
    state: State,
}

impl AnsiStripper {
    /// Appends `input` without its escape sequences to `out`.
    pub fn strip(&mut self, input: &[u8], out: &mut Vec<u8>) {
        const ESC: u8 = 0x1b;
        const BEL: u8 = 0x07;
        for &byte in input {
            self.state = match (self.state, byte) {
                (State::Text, ESC) => State::Escape,
                (State::Text, _) => {
                    out.push(byte);
                    State::Text
                }
                (State::Escape, b'[') => State::ControlSequence,
                (State::Escape, b']') => State::OperatingSystemCommand,
                (State::Escape | State::ControlSequence, 0x40..=0x7e)
                | (State::OperatingSystemCommand, BEL)
                | (State::OperatingSystemCommandEscape, b'\\') => State::Text,
                (State::Escape | State::ControlSequence, _) => State::ControlSequence,
                (State::OperatingSystemCommand | State::OperatingSystemCommandEscape, ESC) => {
                    State::OperatingSystemCommandEscape
                }
                (State::OperatingSystemCommand | State::OperatingSystemCommandEscape, _) => {
                    State::OperatingSystemCommand
                }
            };
        }
    }
}

/// `bytes` without escape sequences.
#[must_use]
pub fn strip_ansi(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    AnsiStripper::default().strip(bytes, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_and_hyperlinks_are_removed_and_text_kept() {
        let nix = b"\x1b[31;1merror:\x1b[0m builder for '\x1b[35;1m/nix/store/x.drv\x1b[0m' failed";
        assert_eq!(
            strip_ansi(nix),
            b"error: builder for '/nix/store/x.drv' failed"
        );
        let link = b"see \x1b]8;;https://nixos.org\x07nixos\x1b]8;;\x1b\\ now";
        assert_eq!(strip_ansi(link), b"see nixos now");
        assert_eq!(
            strip_ansi("naïve\ttext\n".as_bytes()),
            "naïve\ttext\n".as_bytes()
        );
    }

    #[test]
    fn a_sequence_cut_between_chunks_is_removed_whole() {
        let whole = b"a\x1b[1;31mb\x1b[0mc";
        for cut in 0..whole.len() {
            let mut stripper = AnsiStripper::default();
            let mut out = Vec::new();
            stripper.strip(&whole[..cut], &mut out);
            stripper.strip(&whole[cut..], &mut out);
            assert_eq!(out, b"abc", "cut at {cut}");
        }
    }
}
