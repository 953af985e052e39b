// Feature 3: "snap width/height to the reference image" on the FluxCore sampler's menu. It follows the sampler's
// positive input up the chain of Reference Image Encode nodes to the FIRST reference (the one the pipeline takes
// the output size from), reads that image's size from its Load Image preview, and applies the pipeline's rule:
// area capped at 1024x1024 unless keep_size is on, then both sides floored to a multiple of 16.
import { app } from "../../scripts/app.js";
import { toast, widget } from "./fluxcore_common.js";

const SAMPLER = "FluxCoreSampler";
const REFERENCE = "FluxCoreReferenceImageEncode";
const AREA_CAP = 1024 * 1024;

function inputNode(node, name) {
  const slot = node.inputs?.findIndex((i) => i.name === name);
  return slot >= 0 ? node.getInputNode?.(slot) : null;
}

export function firstReference(sampler) {
  let node = inputNode(sampler, "positive");
  let found = null;
  const seen = new Set();
  while (node && !seen.has(node.id) && (node.comfyClass ?? node.type) === REFERENCE) {
    seen.add(node.id);
    found = node;
    node = inputNode(node, "conditioning");
  }
  return found;
}

export function referenceSize(width, height, keepSize) {
  let w = width, h = height;
  if (!keepSize && w * h > AREA_CAP) {
    const s = Math.sqrt(AREA_CAP / (w * h));
    w = Math.floor(w * s);
    h = Math.floor(h * s);
  }
  return [Math.floor(w / 16) * 16, Math.floor(h / 16) * 16];
}

function snap(sampler) {
  const ref = firstReference(sampler);
  if (!ref) {
    toast("warn", "FluxCore", "No Reference Image Encode node feeds this sampler's positive input.");
    return;
  }
  const img = inputNode(ref, "image")?.imgs?.[0];
  if (!img?.naturalWidth) {
    toast("warn", "FluxCore", "The reference image's size is not known yet: load or run the image node first.");
    return;
  }
  const [w, h] = referenceSize(img.naturalWidth, img.naturalHeight, !!widget(ref, "keep_size")?.value);
  for (const [name, value] of [["width", w], ["height", h]]) {
    const wd = widget(sampler, name);
    if (!wd) continue;
    wd.value = value;
    wd.callback?.(value);
  }
  sampler.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "FluxCore.SnapToReference",

  getNodeMenuItems(node) {
    if ((node?.comfyClass ?? node?.type) !== SAMPLER) return [];
    return [{ content: "FluxCore: snap width/height to the reference image", callback: () => snap(node) }];
  },
});
