// Runs one workflow through @saintno/comfyui-sdk as its README shows (ComfyApi, PromptBuilder,
// CallWrapper) and prints what the SDK reported, one JSON line per event.
// Usage: node run.mjs <server url> <request JSON: {workflow, inputs, output, upload?, interrupt?}>
import { readFileSync } from "node:fs";
import { CallWrapper, ComfyApi, PromptBuilder } from "@saintno/comfyui-sdk";

const [url, requestJson] = process.argv.slice(2);
const request = JSON.parse(requestJson);
const say = (event, detail = {}) => console.log(JSON.stringify({ event, ...detail }));

const api = new ComfyApi(url).init();
await api.waitForReady();
let workflow = request.workflow;
if (request.upload) {
  const uploaded = await api.uploadImage(readFileSync(request.upload.path), "upload.png");
  if (!uploaded) throw new Error("upload failed");
  say("uploaded", { filename: uploaded.info.filename });
  workflow = JSON.parse(JSON.stringify(workflow).replaceAll(request.upload.placeholder, uploaded.info.filename));
}
const keys = Object.keys(request.inputs);
let prompt = new PromptBuilder(workflow, keys, ["images"]).setOutputNode("images", request.output);
for (const key of keys) prompt = prompt.setInputNode(key, request.inputs[key].path).input(key, request.inputs[key].value);

// With `interrupt`, the prompt is interrupted at its first progress event. A parked prompt sends
// one (its first step) and waits; CallWrapper listens for progress and for the interruption only
// once it has read the prompt's history, which may answer after that event. So the client's own
// listener takes the event, and the interrupt goes once CallWrapper listens for its answer.
let interrupted = false;
const wrapperListens = () => api.listeners.some((listener) => listener.event === "execution_interrupted");
api.on("progress", async () => {
  if (!request.interrupt || interrupted) return;
  interrupted = true;
  while (!wrapperListens()) await new Promise((resolve) => setTimeout(resolve, 10));
  api.interrupt();
});
const result = await new CallWrapper(api, prompt)
  .onPending((id) => say("pending", { prompt_id: id }))
  .onStart((id) => say("start", { prompt_id: id }))
  .onProgress((info) => say("progress", { value: info.value, max: info.max, node: info.node }))
  .onFailed((error) => say("failed", { name: error.name, message: error.message }))
  .run();
if (result) say("finished", { images: result.images.images.map((image) => api.getPathImage(image)) });
api.destroy();
process.exit(0);
