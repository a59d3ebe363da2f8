// A Node.js client of diffserve that knows no .proto file: it finds the API through server reflection
// (grpc.reflection.v1), passes sampler options as typed values, generates, streams and decodes samples,
// and prints what it saw as one JSON line for tests/test_hardening_js.py to check.
const grpc = require('@grpc/grpc-js');
const { GrpcReflection } = require('grpc-js-reflection-client');

const address = process.argv[2];
const call = (client, method, request) => new Promise((resolve, reject) =>
  client[method](request, (err, reply) => (err ? reject(err) : resolve(reply))));

function decodeTensor(tensor) {
  // diffserve.proto: little-endian, C order; float32 images in [-1, 1]
  const data = Buffer.from(tensor.data);
  const values = [];
  for (let i = 0; i < data.length; i += 4) values.push(data.readFloatLE(i));
  return { dtype: tensor.dtype, shape: tensor.shape.map(Number), values };
}

async function main() {
  const reflection = new GrpcReflection(address, grpc.credentials.createInsecure(), {}, 'v1');
  const services = await reflection.listServices();
  const descriptor = await reflection.getDescriptorBySymbol('diffserve.v1.Diffserve');
  const api = descriptor.getPackageObject({ keepCase: true, longs: String, enums: String, defaults: true,
                                            oneofs: true });
  const client = new api.diffserve.v1.Diffserve(address, grpc.credentials.createInsecure());
  const models = await call(client, 'ListModels', {});
  const request = {
    model: 'gmm', sampler: 'ddim', steps: 3, num_samples: 2, base_seed: 0, format: 'TENSOR',
    // protobufjs builds a map field from a reflected descriptor as its wire form, a list of {key, value}
    // entries (with a .proto file and @grpc/proto-loader it is a plain object: {eta: {number_value: 0.5}})
    typed_options: [{ key: 'eta', value: { number_value: 0.5 } }],
  };
  const reply = await call(client, 'Generate', request);
  const events = [];
  await new Promise((resolve, reject) => {
    const stream = client.GenerateStream({ ...request, format: 'PNG' });
    stream.on('data', (event) => events.push(event));
    stream.on('error', reject);
    stream.on('end', resolve);
  });
  const result = events[events.length - 1].result;
  let refused = null;
  try {
    await call(client, 'Generate', { model: 'gmm', typed_options: [{ key: 'eta', value: { number_value: NaN } }] });
  } catch (err) {
    refused = { code: err.code, details: err.details };
  }
  console.log(JSON.stringify({
    services,
    models: models.models.map((m) => ({ name: m.name, layout: m.layout, value_min: m.value_min,
                                         value_max: m.value_max })),
    seeds: reply.samples.map((s) => s.seed),
    samples: reply.samples.map((s) => decodeTensor(s.tensor)),
    progress: events.filter((e) => e.progress).length,
    png_signature: Buffer.from(result.samples[0].png).subarray(1, 4).toString(),
    stream_seeds: result.samples.map((s) => s.seed),
    refused,
  }));
  client.close();
}

main().catch((err) => { console.error(err.stack || String(err)); process.exit(1); });
