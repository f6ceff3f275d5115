//! Reading a VM's screenshot: what libvirt sends (PNG, or PPM from an older QEMU), what the
//! screen shows in broad terms, and a fingerprint to tell when it stops changing.
//!
//! A screenshot is judged by its shape and colours only (no text recognition):
//! - **text mode**: 720×400 or 640×400 pixels, what QEMU's VGA shows in an 80×25 text mode
//!   — firmware (`SeaBIOS`), boot loaders, a Linux console before its frame buffer. It says
//!   nothing either way.
//! - **blue screen**: more than half the picture in one blue (Windows' stop error, and its
//!   recovery and automatic repair screens): a failure.
//! - **blank or mostly one colour** (above 85 %: a black screen with a prompt, the UEFI
//!   shell, a console): says nothing either way.
//! - **a picture**: anything else in a graphics mode (a login screen, a desktop). Once it
//!   has stayed the same for the settle time, the guest is judged booted.

/// A decoded screenshot: RGB, 3 bytes per pixel, row after row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// RGB bytes.
    pub rgb: Vec<u8>,
}

/// What a screen shows, broadly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScreenKind {
    /// An 80×25 text mode: firmware, a boot loader or a text console.
    TextMode,
    /// Mostly one blue: a Windows stop error or recovery screen.
    BlueScreen,
    /// Blank, or mostly one colour.
    Plain,
    /// A picture in a graphics mode.
    Picture,
}

impl ScreenKind {
    /// In words, for a report.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::TextMode => "a text screen (firmware, a boot loader or a console)",
            Self::BlueScreen => "a blue screen (a Windows stop error or recovery screen)",
            Self::Plain => "a blank or nearly blank screen",
            Self::Picture => "a picture (a login screen or a desktop)",
        }
    }
}

/// Whether two [`Picture::fingerprint`]s show the same screen: at most 2 of the grid's
/// cells differ visibly (a blinking cursor, a ticking clock).
#[must_use]
pub fn same_screen(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let changed = a
        .chunks(3)
        .zip(b.chunks(3))
        .filter(|(x, y)| x.iter().zip(y.iter()).any(|(p, q)| p.abs_diff(*q) > 24))
        .count();
    changed <= 2
}

/// Largest picture decoded: 8K.
const MAX_SIDE: u32 = 8192;

/// Decodes a screenshot as libvirt gives it: PNG (`image/png`) or PPM.
#[must_use]
pub fn decode(mime: &str, bytes: &[u8]) -> Option<Picture> {
    if mime == "image/png" || bytes.starts_with(b"\x89PNG") {
        decode_png(bytes)
    } else {
        decode_ppm(bytes)
    }
}

/// Decodes a PNG into 8-bit RGB, within [`MAX_SIDE`] and 256 MiB.
#[must_use]
pub fn decode_png(bytes: &[u8]) -> Option<Picture> {
    let mut decoder = png::Decoder::new_with_limits(
        std::io::Cursor::new(bytes),
        png::Limits { bytes: 256 << 20 },
    );
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().ok()?;
    let (width, height) = (reader.info().width, reader.info().height);
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return None;
    }
    let mut buf = vec![0; reader.output_buffer_size()?];
    let frame = reader.next_frame(&mut buf).ok()?;
    let data = buf.get(..frame.buffer_size())?;
    let rgb: Vec<u8> = match frame.color_type {
        png::ColorType::Rgb => data.to_vec(),
        png::ColorType::Rgba => data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => data.iter().flat_map(|v| [*v, *v, *v]).collect(),
        png::ColorType::GrayscaleAlpha => data
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        png::ColorType::Indexed => return None,
    };
    let want = usize::try_from(u64::from(width) * u64::from(height) * 3).ok()?;
    (rgb.len() == want).then_some(Picture { width, height, rgb })
}

/// Decodes a binary PPM (`P6`, maximum value up to 255), as QEMU's screendump writes it.
/// `None` for anything else.
#[must_use]
pub fn decode_ppm(bytes: &[u8]) -> Option<Picture> {
    let mut at = 0;
    let mut field = || -> Option<&[u8]> {
        loop {
            while bytes.get(at)?.is_ascii_whitespace() {
                at += 1;
            }
            if *bytes.get(at)? == b'#' {
                while *bytes.get(at)? != b'\n' {
                    at += 1;
                }
                continue;
            }
            break;
        }
        let start = at;
        while !bytes.get(at)?.is_ascii_whitespace() {
            at += 1;
        }
        Some(&bytes[start..at])
    };
    if field()? != b"P6" {
        return None;
    }
    let number = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u32>().ok();
    let width = number(field()?)?;
    let height = number(field()?)?;
    let max = number(field()?)?;
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE || max == 0 || max > 255 {
        return None;
    }
    // One whitespace byte after the maximum, then the pixels.
    let start = at + 1;
    let len = usize::try_from(u64::from(width) * u64::from(height) * 3).ok()?;
    let data = bytes.get(start..start.checked_add(len)?)?;
    let rgb = if max == 255 {
        data.to_vec()
    } else {
        data.iter()
            .map(|v| u8::try_from(u32::from(*v) * 255 / max).unwrap_or(255))
            .collect()
    };
    Some(Picture { width, height, rgb })
}

impl Picture {
    /// What the screen shows.
    #[must_use]
    pub fn kind(&self) -> ScreenKind {
        if matches!((self.width, self.height), (720 | 640, 400)) {
            return ScreenKind::TextMode;
        }
        let (colour, share) = self.main_colour();
        let (r, g, b) = colour;
        if share > 0.5 && b >= 140 && r <= 80 && g <= 150 {
            ScreenKind::BlueScreen
        } else if share > 0.85 {
            ScreenKind::Plain
        } else {
            ScreenKind::Picture
        }
    }

    /// The most common colour (to 16 levels a channel), and its share of the pixels.
    fn main_colour(&self) -> ((u8, u8, u8), f64) {
        let mut counts = vec![0u32; 4096];
        let mut total = 0u32;
        for px in self.rgb.chunks_exact(3).step_by(7) {
            let bucket = (usize::from(px[0] >> 4) << 8)
                | (usize::from(px[1] >> 4) << 4)
                | usize::from(px[2] >> 4);
            counts[bucket] += 1;
            total += 1;
        }
        let (bucket, count) = counts
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| **c)
            .map_or((0, 0), |(b, c)| (b, *c));
        let level = |shift: usize| u8::try_from(((bucket >> shift) & 15) * 16 + 8).unwrap_or(0);
        (
            (level(8), level(4), level(0)),
            f64::from(count) / f64::from(total.max(1)),
        )
    }

    /// A fingerprint of what the screen shows, to tell when it stops changing: a coarse
    /// 32×24 grid of average colours ([`same_screen`] compares two).
    #[must_use]
    pub fn fingerprint(&self) -> Vec<u8> {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut out = Vec::with_capacity(32 * 24 * 3);
        for gy in 0..24 {
            for gx in 0..32 {
                let (x0, x1) = (gx * w / 32, ((gx + 1) * w / 32).max(gx * w / 32 + 1));
                let (y0, y1) = (gy * h / 24, ((gy + 1) * h / 24).max(gy * h / 24 + 1));
                let mut sum = [0u64; 3];
                let mut n = 0u64;
                for y in (y0..y1.min(h)).step_by(2) {
                    for x in (x0..x1.min(w)).step_by(2) {
                        let i = (y * w + x) * 3;
                        for (c, s) in sum.iter_mut().enumerate() {
                            *s += u64::from(self.rgb[i + c]);
                        }
                        n += 1;
                    }
                }
                for s in sum {
                    out.push(u8::try_from(s / n.max(1)).unwrap_or(u8::MAX));
                }
            }
        }
        out
    }

    /// The picture as a PPM file again (for a thumbnailer).
    #[must_use]
    pub fn to_ppm(&self) -> Vec<u8> {
        let mut out = format!("P6\n{} {}\n255\n", self.width, self.height).into_bytes();
        out.extend_from_slice(&self.rgb);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picture(width: u32, height: u32, colour: impl Fn(u32, u32) -> [u8; 3]) -> Picture {
        let mut rgb = Vec::new();
        for y in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(&colour(x, y));
            }
        }
        Picture { width, height, rgb }
    }

    #[test]
    fn a_ppm_round_trips_and_garbage_is_refused() {
        let p = picture(5, 3, |x, y| {
            [u8::try_from(x).unwrap(), u8::try_from(y).unwrap(), 9]
        });
        assert_eq!(decode_ppm(&p.to_ppm()), Some(p.clone()));
        let mut commented = b"P6\n# made by QEMU\n5 3\n255\n".to_vec();
        commented.extend_from_slice(&p.rgb);
        assert_eq!(decode_ppm(&commented), Some(p));
        for bad in [
            &b""[..],
            b"P5\n1 1\n255\n\0",
            b"P6\n0 1\n255\n",
            b"P6\n99999 1\n255\n",
            b"P6\n2 2\n255\n\0\0\0",
            b"P6\n1 1\n65535\n\0\0\0\0\0\0",
            b"P6 1",
        ] {
            assert_eq!(decode_ppm(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_png_screenshot_decodes_to_rgb_and_garbage_is_refused() {
        let p = picture(7, 4, |x, y| {
            [
                u8::try_from(x * 30).unwrap(),
                u8::try_from(y * 60).unwrap(),
                200,
            ]
        });
        for (colour, bytes) in [
            (png::ColorType::Rgb, p.rgb.clone()),
            (
                png::ColorType::Rgba,
                p.rgb
                    .chunks(3)
                    .flat_map(|c| [c[0], c[1], c[2], 255])
                    .collect(),
            ),
        ] {
            let mut file = Vec::new();
            let mut encoder = png::Encoder::new(&mut file, 7, 4);
            encoder.set_color(colour);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&bytes).unwrap();
            writer.finish().unwrap();
            assert_eq!(decode("image/png", &file), Some(p.clone()));
            assert_eq!(decode("image/png", &file[..file.len() / 2]), None);
        }
        assert_eq!(decode("image/png", b"\x89PNG\r\n\x1a\n garbage"), None);
        assert_eq!(decode("image/x-portable-pixmap", &p.to_ppm()), Some(p));
    }

    #[test]
    fn screens_are_told_apart_by_shape_and_colour() {
        assert_eq!(
            picture(720, 400, |_, _| [0, 0, 0]).kind(),
            ScreenKind::TextMode
        );
        // Windows 10/11's stop error blue, with some white text.
        let bsod = picture(1024, 768, |x, y| {
            if y % 40 < 4 && x < 600 {
                [255, 255, 255]
            } else {
                [0, 120, 215]
            }
        });
        assert_eq!(bsod.kind(), ScreenKind::BlueScreen);
        assert_eq!(
            picture(1024, 768, |_, _| [0, 0, 170]).kind(),
            ScreenKind::BlueScreen
        );
        let shell = picture(800, 600, |x, y| {
            if y < 16 && x < 200 {
                [200, 200, 200]
            } else {
                [0, 0, 0]
            }
        });
        assert_eq!(shell.kind(), ScreenKind::Plain);
        let desktop = picture(1024, 768, |x, y| {
            [
                u8::try_from(x % 256).unwrap(),
                u8::try_from(y % 256).unwrap(),
                80,
            ]
        });
        assert_eq!(desktop.kind(), ScreenKind::Picture);
    }

    #[test]
    fn the_fingerprint_ignores_a_blinking_cursor_but_not_a_new_screen() {
        let screen = |cursor: bool, shift: u32| {
            picture(1024, 768, move |x, y| {
                if cursor && (500..508).contains(&x) && (300..316).contains(&y) {
                    [255, 255, 255]
                } else {
                    [
                        u8::try_from((x + shift) % 256).unwrap(),
                        u8::try_from(y % 256).unwrap(),
                        60,
                    ]
                }
            })
        };
        let plain = screen(false, 0).fingerprint();
        assert!(same_screen(&plain, &screen(true, 0).fingerprint()));
        assert!(!same_screen(&plain, &screen(false, 128).fingerprint()));
        assert!(!same_screen(&plain, &plain[3..]));
    }
}
