// vitlens: plotly's FigureWidget module, compiled once per page (see vitlens/widgets/figure.py).
// The two placeholders below (the bundle source as a JSON string, and its hash) are filled in by Python.
const SOURCE = __SOURCE__;
const KEY = Symbol.for("vitlens.plotly-widget.__KEY__");
function bundle() {
  if (!globalThis[KEY]) {
    const url = URL.createObjectURL(new Blob([SOURCE], { type: "text/javascript" }));
    globalThis[KEY] = import(url).finally(() => URL.revokeObjectURL(url));
  }
  return globalThis[KEY];
}
export default () => {
  const widget = bundle().then((mod) => (typeof mod.default === "function" ? mod.default() : mod.default));
  let initialized = Promise.resolve();
  return {
    initialize(context) {
      initialized = widget.then((w) => (w.initialize && !context.signal?.aborted ? w.initialize(context) : undefined));
      return () => initialized.then((cleanup) => (typeof cleanup === "function" ? cleanup() : undefined));
    },
    async render(context) {
      const w = await widget;
      await initialized;
      // A view replaced while the bundle loaded must not draw: its clean-up would
      // then clear the element its successor draws into.
      if (context.signal?.aborted || !w.render) return undefined;
      return w.render(context);
    },
  };
};
