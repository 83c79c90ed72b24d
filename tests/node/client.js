// A Node client of rnnserve.v1, as a grpc-js user writes one: the .proto loaded by @grpc/proto-loader with
// proto/ as its only include directory (google/rpc/status.proto and error_details.proto ship there), then
// real calls to the server at argv[2]. Prints what it saw as one JSON object, for tests/test_node_client.py.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const options = {keepCase: true};  // field names as the .proto spells them: session_id, not sessionId
const definition = protoLoader.loadSync('rnnserve/v1/rnnserve.proto', {...options, includeDirs: [PROTO_ROOT],
                                                                         longs: Number});
const {Inference} = grpc.loadPackageDefinition(definition).rnnserve.v1;
// The error details a failed call carries in its trailers, read with the shipped google/rpc protos.
const details = new protobuf.Root().loadSync(['status.proto', 'error_details.proto'].map(
  (name) => path.join(PROTO_ROOT, 'google', 'rpc', name)), options);

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, {deadline: Date.now() + 10000}, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// A failed call's code and its google.rpc.Status details, each unpacked by its type name.
async function failure(promise) {
  try {
    await promise;
  } catch (error) {
    const [bytes] = error.metadata.get('grpc-status-details-bin');
    const status = details.lookupType('google.rpc.Status').decode(bytes);
    const unpacked = status.details.map((any) => {
      const type = details.lookupType(any.type_url.split('/').pop());
      return {type: type.fullName.slice(1), ...type.toObject(type.decode(any.value))};
    });
    return {code: error.code, details: unpacked};
  }
  throw new Error('the call succeeded');
}

async function main() {
  const client = new Inference(process.argv[2], grpc.credentials.createInsecure());
  const models = (await call(client, 'ListModels', {})).models.map((model) => model.name);
  const created = await call(client, 'CreateSession', {prompt_text: 'The'});
  const sessionId = created.session.session_id;
  const step = await call(client, 'Step', {session_id: sessionId, text: ' q', top_k: 3});
  const notFound = await failure(call(client, 'GetSession', {session_id: 'no-such-session'}));
  const twice = {session_id: sessionId, text: 'u'};
  const repeated = await failure(call(client, 'StepBatch', {steps: [twice, twice]}));
  const after = await call(client, 'GetSession', {session_id: sessionId});
  client.close();
  console.log(JSON.stringify({
    models, created: created.session.position, step: {position: step.position, token_ids: step.prediction.token_ids},
    not_found: notFound, repeated, after: after.position}));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
