// The contract scenario, the same for every client and transport: cancel (while the test holds
// the job on the engine), run with Blob inputs, subscribe (streaming and polling, with logs),
// submit + status + result with a webhook, and three kinds of 422.
//
// `client` adapts one fal client to a common shape:
//   { fal, classes: {ApiError, ValidationError}, unwrap(result) -> {data, requestId} }
// where `fal` has run, subscribe and queue.{submit,status,subscribeToStatus,result,cancel}.

import { HYPER, LIGHTNING, POLL_MS, SIZE, attempt, brief, pngBlob, pollUntil, realFetch } from "./common.mjs";

/** The interesting parts of a model output. */
export function briefOutput(data) {
  if (!data || typeof data !== "object") return data;
  return {
    images: (data.images || []).map((i) => ({
      url: i.url,
      width: i.width,
      height: i.height,
      content_type: i.content_type,
    })),
    seed: data.seed,
    prompt: data.prompt,
    has_nsfw_concepts: data.has_nsfw_concepts,
    timings: data.timings,
  };
}

export async function runScenario({ fal, classes, unwrap }, opts) {
  const { base, hook } = opts;
  const image = pngBlob(opts.image);
  const mask = pngBlob(opts.mask);
  const input = (extra = {}) => ({
    image_url: image,
    mask_url: mask,
    prompt: "a red apple on a table",
    image_size: SIZE,
    num_inference_steps: "2",
    seed: 42,
    ...extra,
  });
  const obs = {};
  const status = (id, logs = true) => fal.queue.status(LIGHTNING, { requestId: id, logs });
  const result = async (id) => unwrap(await fal.queue.result(LIGHTNING, { requestId: id }));

  // 1. Cancel. The test holds the first job after its first denoising step and lets it go only
  //    once the server has seen the cancel, so this is deterministic. A second job submitted
  //    meanwhile is still queued and is cancelled before it starts.
  obs.cancel = await attempt(async () => {
    const out = {};
    const held = await fal.queue.submit(LIGHTNING, { input: input(), webhookUrl: `${hook}/cancelled` });
    out.id = held.request_id;
    out.running = (await pollUntil(() => status(held.request_id), (s) => s.status === "IN_PROGRESS")).map(brief);

    const queued = await fal.queue.submit(LIGHTNING, { input: input({ prompt: "queued behind the held one" }) });
    out.queued = { id: queued.request_id, status: brief(await status(queued.request_id)) };
    out.queued.cancel = await attempt(() => fal.queue.cancel(LIGHTNING, { requestId: queued.request_id }), classes);
    out.queued.final = brief(await status(queued.request_id));

    out.cancelResponse = await attempt(() => fal.queue.cancel(LIGHTNING, { requestId: held.request_id }), classes);
    out.final = brief(
      await fal.queue.subscribeToStatus(LIGHTNING, { requestId: held.request_id, logs: true, pollInterval: POLL_MS }),
    );
    out.result = await attempt(() => result(held.request_id), classes);
    out.cancelAgain = await attempt(() => fal.queue.cancel(LIGHTNING, { requestId: held.request_id }), classes);
    return out;
  }, classes);

  // 2. Sync run, Blob inputs auto-uploaded. The image URL must be fetchable.
  obs.run = await attempt(async () => {
    const { data, requestId } = unwrap(await fal.run(HYPER, { input: input({ num_inference_steps: "1" }) }));
    const url = data.images[0].url;
    const response = await realFetch(url);
    const bytes = new Uint8Array(await response.arrayBuffer());
    return {
      requestId,
      data: briefOutput(data),
      file: { status: response.status, contentType: response.headers.get("content-type"), size: bytes.length },
    };
  }, classes);

  // 3. subscribe over the SSE status stream, with logs.
  obs.streaming = await attempt(async () => {
    const updates = [];
    let enqueued = null;
    const res = unwrap(
      await fal.subscribe(LIGHTNING, {
        input: input(),
        logs: true,
        mode: "streaming",
        onEnqueue: (id) => {
          enqueued = id;
        },
        onQueueUpdate: (s) => updates.push(brief(s)),
      }),
    );
    return { enqueued, updates, requestId: res.requestId, data: briefOutput(res.data) };
  }, classes);

  // 4. subscribe by polling, with logs and a short poll interval.
  obs.polling = await attempt(async () => {
    const updates = [];
    let enqueued = null;
    const res = unwrap(
      await fal.subscribe(LIGHTNING, {
        input: input({ seed: 43 }),
        logs: true,
        pollInterval: POLL_MS,
        onEnqueue: (id) => {
          enqueued = id;
        },
        onQueueUpdate: (s) => updates.push(brief(s)),
      }),
    );
    return { enqueued, updates, requestId: res.requestId, data: briefOutput(res.data) };
  }, classes);

  // 5. submit with a webhook, poll status by hand, fetch the result.
  obs.queue = await attempt(async () => {
    const submitted = await fal.queue.submit(LIGHTNING, { input: input(), webhookUrl: `${hook}/ok` });
    const id = submitted.request_id;
    const statuses = (await pollUntil(() => status(id), (s) => s.status === "COMPLETED")).map(brief);
    const res = await result(id);
    return { submitted, statuses, requestId: res.requestId, data: briefOutput(res.data) };
  }, classes);

  // 6a. 422 from input validation (strength > 1) on a sync run.
  obs.invalidRun = await attempt(() => fal.run(HYPER, { input: input({ strength: 5 }) }), classes);

  // 6b. 422 from a queue submit that lacks the prompt.
  obs.invalidSubmit = await attempt(
    () => fal.queue.submit(LIGHTNING, { input: { image_url: image, mask_url: mask, image_size: SIZE } }),
    classes,
  );

  // 6b'. 422 for text no tokenizer takes: a lone UTF-16 surrogate, which JSON.stringify sends as "\ud800".
  obs.surrogatePrompt = await attempt(
    () => fal.queue.submit(LIGHTNING, { input: input({ prompt: "a red \ud800 apple" }) }),
    classes,
  );

  // 6c. 422 decided by the job (the mask URL cannot be fetched): COMPLETED + error, result raises.
  obs.fetchError = await attempt(async () => {
    const submitted = await fal.queue.submit(LIGHTNING, {
      input: input({ mask_url: `${base}/uploads/AAAAAAAAAAAAAAAA/missing.png` }),
    });
    const id = submitted.request_id;
    const final = (await pollUntil(() => status(id, false), (s) => s.status === "COMPLETED")).pop();
    return { id, final: brief(final), result: await attempt(() => result(id), classes) };
  }, classes);

  return obs;
}
