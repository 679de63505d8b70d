//! `--plot`: a roofline chart as hand-written SVG. Log-log: arithmetic intensity (FLOP per
//! byte of quantized weights) against achieved GFLOP/s, under the measured memory roof
//! (GFLOP/s = bandwidth × intensity) and, if given, a compute ceiling. One numbered point
//! per result, listed with its GB/s, share of the roof and kernel below the chart.

use super::report::Record;
use std::fmt::Write;

const MIN_W: f64 = 960.0;
/// Width of a legend character (11 px monospace).
const CHAR_W: f64 = 6.7;
const PLOT_H: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const LINE: f64 = 16.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Log-scale axis from `lo` to `hi` (powers of ten) onto pixels `a..b`.
struct Axis {
    lo: f64,
    hi: f64,
    a: f64,
    b: f64,
}

impl Axis {
    fn around(values: impl Iterator<Item = f64>, a: f64, b: f64) -> Axis {
        let (mut lo, mut hi) = (f64::INFINITY, 0f64);
        for v in values.filter(|v| v.is_finite() && *v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = (1.0, 10.0);
        }
        let lo = 10f64.powf((lo / 1.5).log10().floor());
        let hi = 10f64.powf((hi * 1.5).log10().ceil()).max(lo * 10.0);
        Axis { lo, hi, a, b }
    }
    fn px(&self, v: f64) -> f64 {
        let t = (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10());
        self.a + t * (self.b - self.a)
    }
    fn contains(&self, v: f64) -> bool {
        v >= self.lo * 0.999 && v <= self.hi * 1.001
    }
    fn decades(&self) -> Vec<f64> {
        let (a, b) = (
            self.lo.log10().round() as i32,
            self.hi.log10().round() as i32,
        );
        (a..=b).map(|e| 10f64.powi(e)).collect()
    }
}

fn label(v: f64) -> String {
    if (1e-3..1e5).contains(&v) {
        format!("{v}")
    } else {
        format!("1e{}", v.log10().round())
    }
}

/// The chart for `records` (those with a FLOP count), under a `gbps` memory roof.
pub fn roofline_svg(records: &[Record], gbps: f64, peak_gflops: Option<f64>) -> String {
    let pts: Vec<(usize, &Record, f64, f64)> = records
        .iter()
        .filter_map(|r| Some((r, r.flops? / r.weight_bytes as f64, r.gflops()?)))
        .enumerate()
        .map(|(i, (r, ai, gf))| (i + 1, r, ai, gf))
        .collect();
    let skipped = records.len() - pts.len();
    let legend: Vec<String> = pts
        .iter()
        .map(|&(i, r, _, gf)| {
            format!(
                "{i:>3}. {} {} {}-bit {}: {:.2} GB/s ({:.0}% of roof), {gf:.1} GFLOP/s, {}",
                r.op,
                r.shape_label(),
                r.bits,
                r.dtype,
                r.gbps(),
                100.0 * r.ratio(),
                r.kernel
            )
        })
        .collect();
    let longest = legend.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let width = MIN_W.max(LEFT + RIGHT + CHAR_W * longest as f64);
    const W: f64 = MIN_W;
    let x = Axis::around(pts.iter().map(|p| p.2), LEFT, W - RIGHT);
    let roof = |ai: f64| (gbps * ai).min(peak_gflops.unwrap_or(f64::INFINITY));
    let y_values = pts.iter().flat_map(|p| [p.3, roof(p.2)]).chain(peak_gflops);
    let y = Axis::around(y_values, TOP + PLOT_H, TOP);
    let legend_lines = pts.len() + 2;
    let h = TOP + PLOT_H + BOTTOM + LINE * legend_lines as f64 + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{h}" viewBox="0 0 {width:.0} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle">mlxq bench roofline: memory roof {gbps:.1} GB/s (measured){}</text>"#,
        W / 2.0,
        peak_gflops.map_or(String::new(), |p| format!(
            ", compute ceiling {p} GFLOP/s (given)"
        ))
    );
    // Grid and axes.
    for v in x.decades() {
        let px = x.px(v);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{}" stroke="#ddd"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            TOP + PLOT_H,
            TOP + PLOT_H + 16.0,
            label(v)
        );
    }
    for v in y.decades() {
        let py = y.px(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            label(v)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{PLOT_H}" fill="none" stroke="#333"/>"##,
        W - LEFT - RIGHT
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">arithmetic intensity, FLOP per byte of quantized weights</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        TOP + PLOT_H + 38.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20 {}) rotate(-90)" text-anchor="middle">achieved GFLOP/s</text>"#,
        TOP + PLOT_H / 2.0
    );
    // The roof, sampled along x and clipped to the plot.
    let steps = 240;
    let roof_pts: Vec<String> = (0..=steps)
        .map(|i| {
            let t = i as f64 / steps as f64;
            x.lo * (x.hi / x.lo).powf(t)
        })
        .filter(|&ai| y.contains(roof(ai)))
        .map(|ai| format!("{:.1},{:.1}", x.px(ai), y.px(roof(ai))))
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#444" stroke-width="2"/>"##,
        roof_pts.join(" ")
    );
    if let Some(end) = roof_pts.last() {
        let (ex, ey) = end.split_once(',').unwrap_or(("0", "0"));
        let _ = writeln!(
            s,
            r##"<text x="{ex}" y="{ey}" dy="-8" text-anchor="end" fill="#444">memory roof {gbps:.1} GB/s</text>"##
        );
    }
    // Points, coloured by op and bits; labels of coincident points step aside.
    let mut keys: Vec<(&str, u32)> = Vec::new();
    let mut colour = |r: &Record| {
        let key = (r.op, r.bits);
        if !keys.contains(&key) {
            keys.push(key);
        }
        COLOURS[keys.iter().position(|k| *k == key).unwrap_or(0) % COLOURS.len()]
    };
    let mut placed: Vec<(f64, f64)> = Vec::new();
    let mut colours = Vec::new();
    for &(i, r, ai, gf) in &pts {
        let c = colour(r);
        colours.push(c);
        let (px, py) = (x.px(ai), y.px(gf));
        let (mut lx, ly) = (px + 6.0, py - 4.0);
        while placed
            .iter()
            .any(|&(qx, qy)| (qx - lx).abs() < 14.0 && (qy - ly).abs() < 10.0)
        {
            lx += 14.0;
        }
        placed.push((lx, ly));
        let _ = writeln!(
            s,
            r#"<circle cx="{px:.1}" cy="{py:.1}" r="5" fill="{c}" fill-opacity="0.8"/><text x="{lx:.1}" y="{ly:.1}" font-size="10">{i}</text>"#
        );
    }
    // Legend.
    let mut ly = TOP + PLOT_H + BOTTOM + LINE;
    for (line, c) in legend.iter().zip(&colours) {
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{ly:.1}" fill="{c}" font-family="monospace" font-size="11" xml:space="preserve">{}</text>"#,
            esc(line)
        );
        ly += LINE;
    }
    if skipped > 0 {
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{ly:.1}" font-size="11">{skipped} (de)quantize result(s) not shown (no FLOP count).</text>"#
        );
    }
    s.push_str("</svg>\n");
    s
}
