// vitlens: plotly's FigureWidget module, shipped to the page once (see vitlens/widgets/figure.py).
// Python fills in the two placeholders: the bundle's hash, and the bundle itself as a JSON string
// (in the first figure of a kernel only; every other figure carries null).
const KEY = Symbol.for("vitlens.plotly-widget.__KEY__");
const SOURCE = __SOURCE__;

// One record per page and bundle: a promise of plotly's module, resolved once some figure provides it.
function shared() {
  if (!globalThis[KEY]) {
    let resolve;
    const promise = new Promise((r) => { resolve = r; });
    globalThis[KEY] = { promise, resolve, started: false, requested: false };
  }
  return globalThis[KEY];
}

function provide(source) {
  const s = shared();
  if (s.started) return;
  s.started = true;
  const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  s.resolve(import(url).finally(() => URL.revokeObjectURL(url)));
}

// No figure on this page carries the bundle (e.g. the page was reloaded): ask the kernel for it,
// once; it answers with the bundle as a binary buffer.
function request(model) {
  const s = shared();
  if (s.started || s.requested) return;
  s.requested = true;
  model.on("msg:custom", (msg, buffers) => {
    if (msg && msg.vitlens === "bundle" && buffers && buffers.length) {
      const data = buffers[0].buffer ? buffers[0] : new Uint8Array(buffers[0]);
      provide(new TextDecoder().decode(data));
    }
  });
  model.send({ vitlens: "bundle" });
}

// plotly works out the point under the pointer at most every 50 ms: a pointer move within 50 ms
// of the last one is looked at 50 ms later. If that deferred look runs while the button is down
// (plotly's gd._dragging), plotly drops the hovered point, and a release within the next 50 ms
// finds none (its own look is deferred too): plotly emits no click and the kernel never hears of
// it. A quick click right after the pointer arrived was lost that way, silently. So while the
// button is down, keep the point it was pressed on: plotly asks "plotly_beforehover" before it
// drops the point, and a press that moves (a drag) is not asked. Where plotly has no such flag,
// nothing changes.
function keepPressedPoint(el) {
  if (typeof el.on === "function") el.on("plotly_beforehover", () => !el._dragging);
}

export default () => {
  if (SOURCE !== null) provide(SOURCE);
  const widget = shared().promise.then((mod) => (typeof mod.default === "function" ? mod.default() : mod.default));
  let initialized = Promise.resolve();
  return {
    initialize(context) {
      if (SOURCE === null) {
        setTimeout(() => { if (!shared().started) request(context.model); }, 300);
      }
      initialized = widget.then((w) => (w.initialize && !context.signal?.aborted ? w.initialize(context) : undefined));
      return () => initialized.then((cleanup) => (typeof cleanup === "function" ? cleanup() : undefined));
    },
    async render(context) {
      const el = context.el;
      el.style.width = "100%"; // fill the output area; plotly (autosize) takes this width
      el.style.minWidth = "0";
      const w = await widget;
      await initialized;
      // A view replaced while the bundle loaded must not draw: its clean-up would
      // then clear the element its successor draws into.
      if (context.signal?.aborted || !w.render) return undefined;
      const cleanup = await w.render(context);
      keepPressedPoint(el);
      // Tell the kernel the width the figure is drawn at, once per change: a widget whose
      // panels would get too small there rearranges them into more rows (Python decides).
      let reported = 0;
      const report = () => {
        const width = Math.round(el.clientWidth);
        if (width > 0 && width !== reported) {
          reported = width;
          context.model.send({ vitlens: "width", width });
        }
      };
      // Follow the output area's width (a side panel opened, the window resized, the
      // view attached after it was drawn): plotly's own responsive handler re-measures.
      const observer = new ResizeObserver(() => {
        if (el._responsiveChartHandler) el._responsiveChartHandler();
        report();
      });
      observer.observe(el);
      report();
      return () => {
        observer.disconnect();
        if (typeof cleanup === "function") cleanup();
      };
    },
  };
};
