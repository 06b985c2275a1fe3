// Time-series charts with uPlot (vendored: static/vendor/uplot).

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed"];

// `span_s`: the x axis covers that many seconds up to now (the overview's hour); `pad_s`: the data's own range
// widened by that much on each side (a single day still gets an axis of days).
export function lineChart(el, { times, series, format = (v) => v, span_s = null, pad_s = 0 }) {
  const width = Math.max(320, el.clientWidth || 420);
  const now = Date.now() / 1000;
  const options = {
    width,
    height: 180,
    legend: { show: true },
    scales: {
      x: { time: true, range: (u, min, max) => (span_s ? [now - span_s, now] : [min - pad_s, max + pad_s]) },
      y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] },
    },
    series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { size: 5 },
      value: (u, v) => (v === null || v === undefined ? "–" : format(v)) }))],
    axes: [{ space: 90 }, { values: (u, values) => values.map((v) => format(v)), size: 60 }],
  };
  return new uPlot(options, [times, ...series.map((s) => s.values)], el);
}
