//! The head of a libvirt QEMU save image (what `virDomainSave`, a managed save and a live
//! snapshot's memory file hold, and what a full-state checkpoint keeps as its `memory`
//! blob): read to check an image before a restore, and rewritten to resume a copy of a VM
//! under a new name and UUID.
//!
//! Layout (libvirt's `src/qemu/qemu_saveimage.h`, format version 2, unchanged from libvirt
//! 0.9 to 9.x): a 92-byte header — the magic `LibvirtQemudSave` (`LibvirtQemudPart` while
//! the save is unfinished), then `version`, `data_len`, `was_running`, `compressed`,
//! `cookieOffset` and 14 unused words, all `u32` in the saving host's byte order — then
//! `data_len` bytes of data: the domain XML ending in a NUL byte, the migration cookie
//! (XML ending in a NUL byte) at `cookieOffset`, and zero padding. QEMU's migration stream
//! follows.
//!
//! libvirt resumes a saved image only as the VM it was saved from: a definition passed to
//! `virDomainRestoreFlags` must keep the UUID (its ABI check says "Target domain uuid … does
//! not match source …"). A copy beside the original needs its own UUID, so Rewind writes
//! the copy's name and UUID into the head of the staged image and passes every other change
//! through libvirt, whose ABI check still guards them. The guest cannot tell: it read its
//! SMBIOS UUID when it booted.

/// The length of the fixed header.
pub const HEADER_LEN: usize = 92;
const MAGIC: &[u8; 16] = b"LibvirtQemudSave";
const PARTIAL_MAGIC: &[u8; 16] = b"LibvirtQemudPart";
const VERSION: u32 = 2;
/// More data than this in a head is not a libvirt save image (a few KiB of XML and 64 KiB
/// of padding are usual).
const MAX_DATA_LEN: u32 = 16 << 20;

/// The header and data of a save image, before QEMU's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveImageHead {
    header: [u8; HEADER_LEN],
    data_len: usize,
    swapped: bool,
    xml: String,
    cookie: Vec<u8>,
}

fn word(bytes: &[u8], at: usize, swapped: bool) -> u32 {
    let raw: [u8; 4] = bytes[at..at + 4].try_into().expect("4 bytes");
    let v = u32::from_ne_bytes(raw);
    if swapped { v.swap_bytes() } else { v }
}

fn put_word(bytes: &mut [u8], at: usize, v: u32, swapped: bool) {
    let v = if swapped { v.swap_bytes() } else { v };
    bytes[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

/// What is wrong with a save image's head, or with a new domain XML for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SaveImageError {
    /// Fewer bytes than a header.
    #[error("it is shorter than a libvirt save image's header")]
    TooShort,
    /// libvirt began the save and never finished it.
    #[error("it is a save that libvirt never finished (magic LibvirtQemudPart)")]
    Unfinished,
    /// Another kind of file.
    #[error("it is not a libvirt save image (no LibvirtQemudSave magic)")]
    NotASaveImage,
    /// A format version Rewind does not know.
    #[error("its save format version {0} is not the one Rewind knows ({VERSION})")]
    Version(u32),
    /// A header that claims more XML than any libvirt writes.
    #[error("its header claims {0} bytes of XML")]
    DataTooLong(u32),
    /// The head ends before its header says.
    #[error("it is cut short inside its header")]
    CutShort,
    /// The domain XML has no terminating NUL.
    #[error("its domain XML does not end")]
    XmlUnterminated,
    /// The domain XML is not UTF-8.
    #[error("its domain XML is not UTF-8")]
    XmlNotUtf8,
    /// The migration cookie's offset points outside the head.
    #[error("its migration cookie is outside its header")]
    CookieOutside,
    /// A new domain XML holds a NUL byte.
    #[error("the new domain XML holds a NUL byte")]
    XmlHasNul,
    /// A new domain XML is longer than the room the image has for it.
    #[error("the new domain XML ({len} bytes) does not fit the {room} bytes the image has for it")]
    XmlTooLong {
        /// Its length.
        len: usize,
        /// The room.
        room: usize,
    },
}

impl SaveImageHead {
    /// The whole head's length (header and data), from an image's first [`HEADER_LEN`]
    /// bytes or more.
    pub fn len_from(first: &[u8]) -> Result<usize, SaveImageError> {
        let header = first.get(..HEADER_LEN).ok_or(SaveImageError::TooShort)?;
        match &header[..16] {
            m if m == MAGIC => {}
            m if m == PARTIAL_MAGIC => return Err(SaveImageError::Unfinished),
            _ => return Err(SaveImageError::NotASaveImage),
        }
        let swapped = match word(header, 16, false) {
            VERSION => false,
            v if v.swap_bytes() == VERSION => true,
            v => return Err(SaveImageError::Version(v)),
        };
        let data_len = word(header, 20, swapped);
        if data_len > MAX_DATA_LEN {
            return Err(SaveImageError::DataTooLong(data_len));
        }
        Ok(HEADER_LEN + data_len as usize)
    }

    /// Reads a head (at least [`SaveImageHead::len_from`] bytes; more are ignored).
    pub fn parse(bytes: &[u8]) -> Result<Self, SaveImageError> {
        let len = Self::len_from(bytes)?;
        let bytes = bytes.get(..len).ok_or(SaveImageError::CutShort)?;
        let swapped = word(bytes, 16, false) != VERSION;
        let data = &bytes[HEADER_LEN..];
        let xml_end = data
            .iter()
            .position(|&b| b == 0)
            .ok_or(SaveImageError::XmlUnterminated)?;
        let xml = std::str::from_utf8(&data[..xml_end])
            .map_err(|_| SaveImageError::XmlNotUtf8)?
            .to_owned();
        let cookie_at = word(bytes, 32, swapped) as usize;
        let cookie = if cookie_at == 0 {
            Vec::new()
        } else {
            let rest = data
                .get(cookie_at..)
                .filter(|_| cookie_at > xml_end)
                .ok_or(SaveImageError::CookieOutside)?;
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            rest[..end].to_vec()
        };
        Ok(Self {
            header: bytes[..HEADER_LEN].try_into().expect("checked length"),
            data_len: len - HEADER_LEN,
            swapped,
            xml,
            cookie,
        })
    }

    /// The head's length in the image: header and data.
    #[must_use]
    pub fn len(&self) -> usize {
        HEADER_LEN + self.data_len
    }

    /// Always false: a head has its header.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The domain XML libvirt saved with the image.
    #[must_use]
    pub fn xml(&self) -> &str {
        &self.xml
    }

    /// The same head of the same length with `xml` as the domain XML (the cookie kept), to
    /// write over the image's first [`SaveImageHead::len`] bytes.
    pub fn with_xml(&self, xml: &str) -> Result<Vec<u8>, SaveImageError> {
        if xml.as_bytes().contains(&0) {
            return Err(SaveImageError::XmlHasNul);
        }
        let mut data = Vec::with_capacity(self.data_len);
        data.extend_from_slice(xml.as_bytes());
        data.push(0);
        let cookie_at = if self.cookie.is_empty() {
            0
        } else {
            let at = data.len();
            data.extend_from_slice(&self.cookie);
            data.push(0);
            at
        };
        if data.len() > self.data_len {
            return Err(SaveImageError::XmlTooLong {
                len: xml.len(),
                room: self.data_len,
            });
        }
        data.resize(self.data_len, 0);
        let mut out = self.header.to_vec();
        put_word(
            &mut out,
            32,
            u32::try_from(cookie_at).expect("below MAX_DATA_LEN"),
            self.swapped,
        );
        out.extend_from_slice(&data);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head the way libvirt 9.0 writes one (XML, cookie, padding).
    fn head(xml: &str, cookie: &str, pad: usize) -> Vec<u8> {
        let mut data = xml.as_bytes().to_vec();
        data.push(0);
        let cookie_at = data.len();
        data.extend_from_slice(cookie.as_bytes());
        data.push(0);
        data.resize(data.len() + pad, 0);
        let mut out = MAGIC.to_vec();
        for w in [2u32, u32::try_from(data.len()).unwrap(), 1, 0]
            .into_iter()
            .chain([u32::try_from(cookie_at).unwrap()])
            .chain([0; 14])
        {
            out.extend_from_slice(&w.to_ne_bytes());
        }
        out.extend_from_slice(&data);
        out.extend_from_slice(b"QEVM\0\0\0\x03");
        out
    }

    #[test]
    fn a_head_is_read_and_rewritten_in_place() {
        let image = head("<domain><name>a</name></domain>", "<cookie/>", 4096);
        let parsed = SaveImageHead::parse(&image).unwrap();
        assert_eq!(parsed.xml(), "<domain><name>a</name></domain>");
        assert_eq!(
            parsed.len(),
            image.len() - 8,
            "QEMU's stream is not part of it"
        );
        let new = parsed
            .with_xml("<domain><name>a longer name</name></domain>")
            .unwrap();
        assert_eq!(new.len(), parsed.len(), "the stream stays where it is");
        let again = SaveImageHead::parse(&new).unwrap();
        assert_eq!(again.xml(), "<domain><name>a longer name</name></domain>");
        assert_eq!(again.cookie, b"<cookie/>");
        assert_eq!(&new[..20], &image[..20], "magic and version kept");
    }

    #[test]
    fn what_is_not_a_whole_libvirt_save_image_is_refused_with_the_reason() {
        let good = head("<domain/>", "<cookie/>", 16);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..40].to_vec(), "shorter than"),
            (b"QEVM".repeat(30), "not a libvirt save image"),
            (
                [PARTIAL_MAGIC.as_slice(), &good[16..]].concat(),
                "never finished",
            ),
            (
                {
                    let mut b = good.clone();
                    b[16..20].copy_from_slice(&7u32.to_ne_bytes());
                    b
                },
                "version 7",
            ),
            (
                {
                    let mut b = good.clone();
                    b[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
                    b
                },
                "claims",
            ),
            (good[..HEADER_LEN + 4].to_vec(), "cut short"),
            (
                {
                    let mut b = good.clone();
                    b[32..36].copy_from_slice(&9_999u32.to_ne_bytes());
                    b
                },
                "cookie is outside",
            ),
        ];
        for (bytes, says) in cases {
            let err = SaveImageHead::parse(&bytes).expect_err(says);
            assert!(err.to_string().contains(says), "{err} (expected {says:?})");
        }
        let parsed = SaveImageHead::parse(&good).unwrap();
        let err = parsed.with_xml(&"x".repeat(100)).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    proptest::proptest! {
        /// A memory blob comes from a store anyone may have written: any bytes give an
        /// answer, never a panic, and a head written back keeps its length.
        #[test]
        fn any_bytes_are_read_or_refused_without_a_panic(
            xml_len in 0usize..200,
            pad in 0usize..64,
            flips in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 0..6),
            cut in 0usize..400,
        ) {
            let mut image = head(&"x".repeat(xml_len), "<c/>", pad);
            for (at, byte) in flips {
                if let Some(b) = image.get_mut(at) {
                    *b = byte;
                }
            }
            image.truncate(cut.max(1));
            if let Ok(parsed) = SaveImageHead::parse(&image)
                && let Ok(again) = parsed.with_xml(parsed.xml())
            {
                proptest::prop_assert_eq!(again.len(), parsed.len());
            }
        }
    }

    #[test]
    fn a_head_from_a_host_of_the_other_byte_order_is_read_and_written_in_its_order() {
        let mut image = head("<domain/>", "<c/>", 64);
        for at in (16..HEADER_LEN).step_by(4) {
            image[at..at + 4].reverse();
        }
        let parsed = SaveImageHead::parse(&image).unwrap();
        assert_eq!(parsed.xml(), "<domain/>");
        let new = parsed.with_xml("<domain><x/></domain>").unwrap();
        assert_eq!(
            SaveImageHead::parse(&new).unwrap().cookie,
            b"<c/>",
            "the cookie offset is written in the image's order"
        );
    }
}
