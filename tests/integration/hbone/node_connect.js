// Interop: Node's http2 client against our HBONE server (PROTOCOLS.md §6).
// usage: node node_connect.js <port> <client cert+chain PEM> <client key PEM> <root PEM> <echo authority>
// Prints one JSON line with what it saw; exits 0 when every check passed.
'use strict';
const http2 = require('http2');
const fs = require('fs');

const [port, certFile, keyFile, caFile, authority] = process.argv.slice(2);
const result = {};

function fail(why) {
  result.error = String(why);
  console.log(JSON.stringify(result));
  process.exit(1);
}

const session = http2.connect(`https://127.0.0.1:${port}`, {
  cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile), ca: fs.readFileSync(caFile),
  minVersion: 'TLSv1.3', ALPNProtocols: ['h2'],
  checkServerIdentity: () => undefined,  // SPIFFE identities are URI SANs; checked below instead
});
session.on('error', fail);
setTimeout(() => fail('timed out'), 10000).unref();

function connectEcho() {
  return new Promise((resolve, reject) => {
    const peer = session.socket.getPeerCertificate();
    result.serverSan = peer.subjectaltname;
    const req = session.request({
      ':method': 'CONNECT', ':authority': authority,
      'baggage': 'k8s.namespace.name=node', 'forwarded': 'for="10.0.0.9:5000"',
      'traceparent': '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00',
    });
    const chunks = [];
    req.on('response', (headers) => { result.connectStatus = headers[':status']; req.end('ping from node'); });
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => { result.echo = Buffer.concat(chunks).toString(); resolve(); });
    req.on('error', reject);
  });
}

function getRequest() {
  return new Promise((resolve, reject) => {
    const req = session.request({ ':method': 'GET', ':path': '/' });
    req.on('response', (headers) => { result.getStatus = headers[':status']; });
    req.on('close', resolve);
    req.on('error', reject);
    req.resume();
    req.end();
  });
}

(async () => {
  await new Promise((resolve) => session.once('connect', resolve));
  await connectEcho();
  await getRequest();
  session.close();
  const ok = result.connectStatus === 200 && result.echo === 'ping from node' && result.getStatus === 400;
  console.log(JSON.stringify(result));
  process.exit(ok ? 0 : 1);
})().catch(fail);
