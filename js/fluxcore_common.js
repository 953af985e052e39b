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
// The canvas draws a node's badges in one row above its title, right-aligned to the node by default, so a badge
// wider than the node runs over the neighbour's badges. Each of ours is therefore fitted, whenever it is drawn,
// into the node's width left over by the other badges: whole " · " parts are dropped from the end (shown as "…");
// the full text stays in __fluxcoreBadgeTexts for the menu entries. The size warning is fitted first.
const PRIORITY = ["size", "chosen"];
const GAP = 2; // LGraphNode.drawBadges' gap between badges
let measureCtx = null;

function measure(badge, text) {
  measureCtx ??= document.createElement("canvas").getContext("2d");
  badge.text = text;
  return badge.getWidth(measureCtx);
}

export function fitText(badge, text, room) {
  if (measure(badge, text) <= room) return text;
  const parts = text.split(" · ");
  for (let n = parts.length - 1; n >= 1; n--) {
    const shorter = parts.slice(0, n).join(" · ") + " …";
    if (measure(badge, shorter) <= room) return shorter;
  }
  for (let n = parts[0].length - 1; n >= 1; n--) {
    const shorter = parts[0].slice(0, n) + "…";
    if (measure(badge, shorter) <= room) return shorter;
  }
  return "";
}

function fitAll(node) {
  const ours = node.__fluxcoreBadges ?? {};
  const Badge = window.LGraphBadge;
  let room = (node.width ?? node.size?.[0] ?? 0) + GAP;
  for (const b of node.badges ?? []) {
    if (b?.fluxcoreKey) continue;
    const other = Badge && b instanceof Badge ? b : typeof b === "function" ? b() : null;
    if (other?.visible !== false && other?.getWidth) room -= measure(other, other.text) + GAP;
  }
  const keys = Object.keys(ours).sort((a, b) => rank(a) - rank(b));
  for (const key of keys) {
    const badge = ours[key].badge;
    badge.text = fitText(badge, node.__fluxcoreBadgeTexts[key], room - GAP);
    if (badge.text) room -= measure(badge, badge.text) + GAP;
  }
}

function rank(key) {
  const i = PRIORITY.indexOf(key);
  return i < 0 ? PRIORITY.length : i;
}

export function setBadge(node, key, text, colors = {}) {
  node.__fluxcoreBadges ??= {};
  node.__fluxcoreBadgeTexts ??= {};
  const Badge = window.LGraphBadge;
  const old = node.__fluxcoreBadges[key];
  if (old) node.badges = (node.badges ?? []).filter((b) => b !== old);
  delete node.__fluxcoreBadges[key];
  delete node.__fluxcoreBadgeTexts[key];
  if (text && Badge) {
    const badge = new Badge({ text, fgColor: colors.fg ?? "#e8f5e9", bgColor: colors.bg ?? "#1b3a2a" });
    const getter = () => {
      fitAll(node);
      return badge;
    };
    getter.fluxcoreKey = key;
    getter.badge = badge;
    node.__fluxcoreBadges[key] = getter;
    node.__fluxcoreBadgeTexts[key] = text;
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

// The full text of one of our badges (what was set, before fitting to the node's width).
export function badgeText(node, key) {
  return node.__fluxcoreBadgeTexts?.[key] ?? null;
}

export function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

export function toast(severity, summary, detail) {
  const t = app.extensionManager?.toast;
  if (t?.add) t.add({ severity, summary, detail, life: 6000 });
}
