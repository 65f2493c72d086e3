//! Loss curves as a PNG: lines, a light grid with numbered ticks, a legend and a title, drawn into
//! an RGB buffer (text from the public-domain 8x8 font) and encoded with the `png` crate. No
//! system fonts or native libraries, so it works on a fresh machine.

use std::path::Path;

/// One curve: its legend label and `(x, y)` points in drawing order.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const W: usize = 820;
const H: usize = 520;
const LEFT: usize = 80;
const RIGHT: usize = 20;
const TOP: usize = 44;
const BOTTOM: usize = 56;
const COLORS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [23, 190, 207],
];

struct Canvas(Vec<u8>);

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.0[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Bresenham, `width` pixels thick (vertically offset copies).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], width: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for o in 0..width {
                self.set(x, y + o, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// ASCII text with its top-left corner at `(x, y)`, each font pixel `scale` pixels wide.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3], scale: i64) {
        for (k, ch) in s.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[(ch as usize).min(127)];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        for (u, v) in (0..scale).flat_map(|u| (0..scale).map(move |v| (u, v))) {
                            let px = x + (k as i64 * 8 + col) * scale + u;
                            self.set(px, y + row as i64 * scale + v, c);
                        }
                    }
                }
            }
        }
    }
}

/// Writes `series` as a line plot to `path` (PNG, 820x520).
pub fn write_png(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), String> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all() {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !(x0.is_finite() && y0.is_finite()) {
        return Err("nothing to plot".into());
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    (y0, y1) = (y0 - pad, y1 + pad);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let to_px = |x: f64, y: f64| {
        (
            LEFT as i64 + ((x - x0) / (x1 - x0) * pw).round() as i64,
            TOP as i64 + ((y1 - y) / (y1 - y0) * ph).round() as i64,
        )
    };
    let mut c = Canvas(vec![255; W * H * 3]);
    let (grid, axis, ink) = ([225, 225, 225], [90, 90, 90], [20, 20, 20]);
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let (gx, _) = to_px(x0 + f * (x1 - x0), y0);
        let (_, gy) = to_px(x0, y0 + f * (y1 - y0));
        c.line((gx, TOP as i64), (gx, (H - BOTTOM) as i64), grid, 1);
        c.line((LEFT as i64, gy), ((W - RIGHT) as i64, gy), grid, 1);
        let xl = format!("{:.0}", x0 + f * (x1 - x0));
        c.text(
            gx - 4 * xl.len() as i64,
            (H - BOTTOM + 8) as i64,
            &xl,
            ink,
            1,
        );
        let yl = format!("{:.2}", y0 + f * (y1 - y0));
        c.text(LEFT as i64 - 8 - 8 * yl.len() as i64, gy - 4, &yl, ink, 1);
    }
    let corner = (LEFT as i64, (H - BOTTOM) as i64);
    c.line((LEFT as i64, TOP as i64), corner, axis, 1);
    c.line(corner, ((W - RIGHT) as i64, (H - BOTTOM) as i64), axis, 1);
    c.text(LEFT as i64, 12, title, ink, 2);
    let xl_x = (LEFT + (W - LEFT - RIGHT) / 2) as i64 - 4 * x_label.len() as i64;
    c.text(xl_x, (H - 22) as i64, x_label, ink, 1);
    c.text(8, TOP as i64 - 14, y_label, ink, 1);
    for (k, s) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        for w in s.points.windows(2) {
            c.line(to_px(w[0].0, w[0].1), to_px(w[1].0, w[1].1), color, 2);
        }
        let ly = TOP as i64 + 10 + 16 * k as i64;
        let lx = (W - RIGHT - 200) as i64;
        c.line((lx, ly + 3), (lx + 24, ly + 3), color, 3);
        c.text(lx + 32, ly, &s.label, ink, 1);
    }
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc
        .write_header()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writer
        .write_image_data(&c.0)
        .map_err(|e| format!("{}: {e}", path.display()))
}
