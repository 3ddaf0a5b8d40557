// PiD Decode starts with its seed fixed: re-queueing an unchanged graph then reuses the (minutes-long) decode
// from ComfyUI's cache instead of redrawing the same picture with a new seed. A saved workflow keeps its choice:
// nodeCreated runs before a loaded node gets its saved widget values.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "comfyui-pid.DecodeSeedFixed",
  nodeCreated(node) {
    if (node.comfyClass !== "PixelDecoderPiD_Decode") return;
    const control = node.widgets?.find((widget) => widget.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
});
