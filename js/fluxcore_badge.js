// Feature 1: a badge on every FluxCore node with the backend / precision / variant actually chosen, taken from
// the node's execution output (`ui.fluxcore[0] = {badge, details}`), plus a menu entry that shows why.
import { app } from "../../scripts/app.js";
import { chain, clearBadges, isOurs, setBadge, toast } from "./fluxcore_common.js";

app.registerExtension({
  name: "FluxCore.Badge",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isOurs(nodeData)) return;
    chain(nodeType.prototype, "onExecuted", function (message) {
      const info = message?.fluxcore?.[0];
      if (!info?.badge) return;
      this.__fluxcoreInfo = info;
      setBadge(this, "chosen", info.badge);
    });
    chain(nodeType.prototype, "onRemoved", function () {
      clearBadges(this);
      delete this.__fluxcoreInfo;
    });
  },

  getNodeMenuItems(node) {
    if (!isOurs(node) || !node.__fluxcoreInfo) return [];
    const info = node.__fluxcoreInfo;
    return [{
      content: "FluxCore: why this backend / precision?",
      callback: () => toast("info", info.badge, (info.details ?? []).join("\n") || "no details"),
    }];
  },
});
