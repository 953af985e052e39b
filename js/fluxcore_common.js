// Helpers shared by the FluxCore extensions (imported by each feature file; not an extension itself).
import { app } from "../../scripts/app.js";

export const PREFIX = "FluxCore";

export function isOurs(nodeDataOrNode) {
  const name = nodeDataOrNode?.name ?? nodeDataOrNode?.comfyClass ?? nodeDataOrNode?.constructor?.comfyClass ?? nodeDataOrNode?.type;
  return typeof name === "string" && name.startsWith(PREFIX);
}

// Chain a prototype method instead of overwriting it: the original (if any) runs first, its result is kept.
export function chain(target, method, extra) {
  const original = target[method];
  target[method] = function (...args) {
    const result = original?.apply(this, args);
    extra.apply(this, args);
    return result;
  };
}

// Keep one named badge per feature on a node: works with both the canvas renderer (drawBadges) and the Vue node
// renderer (reads node.badges; told through the node:property:changed event, as the frontend's own badges do).
export function setBadge(node, key, text, colors = {}) {
  node.__fluxcoreBadges ??= {};
  const Badge = window.LGraphBadge;
  const old = node.__fluxcoreBadges[key];
  if (old) node.badges = (node.badges ?? []).filter((b) => b !== old);
  delete node.__fluxcoreBadges[key];
  if (text && Badge) {
    const badge = new Badge({ text, fgColor: colors.fg ?? "#e8f5e9", bgColor: colors.bg ?? "#1b3a2a" });
    const getter = () => badge;
    getter.fluxcoreKey = key;
    node.__fluxcoreBadges[key] = getter;
    node.badges = [...(node.badges ?? []), getter];
  }
  node.graph?.trigger?.("node:property:changed", {
    type: "node:property:changed", nodeId: node.id, property: "badges", oldValue: node.badges, newValue: node.badges,
  });
  node.setDirtyCanvas?.(true, true);
}

export function clearBadges(node) {
  for (const key of Object.keys(node.__fluxcoreBadges ?? {})) setBadge(node, key, null);
}

export function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

export function toast(severity, summary, detail) {
  const t = app.extensionManager?.toast;
  if (t?.add) t.add({ severity, summary, detail, life: 6000 });
}
