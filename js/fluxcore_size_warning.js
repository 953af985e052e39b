// Feature 2: a warning badge on the FluxCore sampler when width/height are not multiples of 16 (the sampler
// floors them, as diffusers does, so the image would come out smaller than asked). 0 means "automatic" and is fine.
// The number widget itself snaps typed values to its step, so this catches what arrives otherwise: workflows
// saved elsewhere, API-made graphs, values set by other extensions.
import { app } from "../../scripts/app.js";
import { chain, clearBadges, setBadge, toast, widget } from "./fluxcore_common.js";

const SAMPLER = "FluxCoreSampler";
const MULTIPLE = 16;

export function sizeProblem(node) {
  const bad = ["width", "height"].filter((name) => {
    const v = Number(widget(node, name)?.value);
    return Number.isFinite(v) && v !== 0 && v % MULTIPLE !== 0;
  });
  if (!bad.length) return null;
  return bad.map((n) => `${n} ${widget(node, n).value}`).join(", ") + ` not a multiple of ${MULTIPLE}`;
}

function refresh(node) {
  const problem = sizeProblem(node);
  if (problem === node.__fluxcoreSizeWarning && node.__fluxcoreBadges) return;
  node.__fluxcoreSizeWarning = problem;
  setBadge(node, "size", problem ? `⚠ ${problem}` : null, { fg: "#fff3e0", bg: "#8a3b00" });
  // once per new problem, also as a toast: the Vue node renderer (Nodes 2.0) does not redraw extension badges
  if (problem) toast("warn", "FluxCore sampler", `${problem}: the image will be ${floored(node)}.`);
}

function floored(node) {
  const [w, h] = ["width", "height"].map((n) => Number(widget(node, n)?.value));
  return `${Math.floor(w / MULTIPLE) * MULTIPLE || "auto"}x${Math.floor(h / MULTIPLE) * MULTIPLE || "auto"}`;
}

function watch(node) {
  for (const name of ["width", "height"]) {
    const w = widget(node, name);
    if (!w || w.__fluxcoreWatched) continue;
    w.__fluxcoreWatched = true;
    const original = w.callback;
    w.callback = function (...args) {
      const r = original?.apply(this, args);
      refresh(node);
      return r;
    };
  }
  refresh(node);
}

app.registerExtension({
  name: "FluxCore.SizeWarning",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== SAMPLER) return;
    chain(nodeType.prototype, "onNodeCreated", function () { watch(this); });
    chain(nodeType.prototype, "onConfigure", function () { queueMicrotask(() => watch(this)); });
    chain(nodeType.prototype, "onWidgetChanged", function () { refresh(this); });
    // values can also arrive without a widget callback (links, other extensions): re-check when drawn (cheap)
    chain(nodeType.prototype, "onDrawForeground", function () { refresh(this); });
    chain(nodeType.prototype, "onRemoved", function () {
      clearBadges(this);
      delete this.__fluxcoreSizeWarning;
    });
  },
});
