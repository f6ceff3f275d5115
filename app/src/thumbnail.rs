//! Pictures' thumbnails for the Files view, made where the engine runs (this process, or
//! the protection service, which is this binary too): the core has no image codecs.

use rewind_core::engine::files::THUMBNAIL_PIXELS;

/// Lets the engine of this process make thumbnails.
pub fn install() {
    rewind_core::engine::files::set_thumbnailer(make);
}

/// A PNG thumbnail of the picture in `bytes` (`png`, `jpeg`, `gif`, `webp`, `bmp`, or a
/// screenshot's `ppm`), if it decodes. A guest's file is input anyone may have written: the
/// decoder's limits bound what it allocates.
fn make(bytes: &[u8], kind: &str) -> Option<Vec<u8>> {
    let format = match kind {
        "png" => image::ImageFormat::Png,
        "jpeg" => image::ImageFormat::Jpeg,
        "gif" => image::ImageFormat::Gif,
        "webp" => image::ImageFormat::WebP,
        "bmp" => image::ImageFormat::Bmp,
        // A VM's screenshot, as QEMU takes it (a boot-check's).
        "ppm" => image::ImageFormat::Pnm,
        _ => return None,
    };
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(256 << 20);
    limits.max_image_width = Some(20_000);
    limits.max_image_height = Some(20_000);
    reader.limits(limits);
    let picture = reader.decode().ok()?;
    let small = picture.thumbnail(THUMBNAIL_PIXELS, THUMBNAIL_PIXELS);
    let mut png = Vec::new();
    small
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .ok()?;
    Some(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picture_becomes_a_small_png_and_garbage_none() {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(1000, 500, image::Rgb([10, 200, 30]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let small = make(&png, "png").unwrap();
        let back = image::load_from_memory_with_format(&small, image::ImageFormat::Png).unwrap();
        assert_eq!((back.width(), back.height()), (320, 160));
        assert!(make(b"not a picture at all", "jpeg").is_none());
        assert!(make(&png[..png.len() / 2], "png").is_none());
    }

    /// GIF (its first frame), WebP and BMP, as the Files view previews them.
    #[test]
    fn gif_webp_and_bmp_pictures_become_small_pngs() {
        let picture = image::RgbaImage::from_fn(640, 480, |x, y| {
            image::Rgba([x.to_le_bytes()[0], y.to_le_bytes()[0], 90, 255])
        });
        for (kind, format) in [
            ("gif", image::ImageFormat::Gif),
            ("webp", image::ImageFormat::WebP),
            ("bmp", image::ImageFormat::Bmp),
        ] {
            let mut bytes = Vec::new();
            picture
                .write_to(&mut std::io::Cursor::new(&mut bytes), format)
                .unwrap();
            let small = make(&bytes, kind).unwrap_or_else(|| panic!("no thumbnail of a {kind}"));
            let back =
                image::load_from_memory_with_format(&small, image::ImageFormat::Png).unwrap();
            assert_eq!((back.width(), back.height()), (320, 240), "{kind}");
            assert!(make(&bytes[..bytes.len() / 3], kind).is_none(), "{kind}");
        }
    }
}
