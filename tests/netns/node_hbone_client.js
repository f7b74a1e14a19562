// Interop: Node's http2 client (its own HTTP/2 and TLS stacks) sends one request to an HBONE server
// (PROTOCOLS.md §6) and reports what it saw. Used by test_ztunnel_node_interop.py.
//
// usage: node node_hbone_client.js '<spec JSON>'
//   spec: {host, port, localAddress, ca,            // where to connect, from which address; root PEM file
//          cert?, key?,                             // client certificate chain + key PEM files (absent: none)
//          method, authority,                       // the request head (CONNECT or anything else)
//          payloadSize}                             // bytes sent once a 200 arrives, then half close
// Prints one JSON line and exits 0 whatever the server did; only a bug in this script exits non-zero:
//   connected      TLS handshake finished on our side (TLS 1.3: before the server judged our certificate)
//   serverSan      the server leaf's subjectAltName as Node prints it ("URI:spiffe://...")
//   settings       the server sent its HTTP/2 SETTINGS (it accepted the connection)
//   status         :status of the response, or null
//   greeting       bytes received up to the first "\n" (the app's greeting), when a 200 came
//   echoLength, echoSha256, sentSha256   the bytes after the greeting vs the bytes we sent
//   sessionError, streamError, socketError   Node error codes, e.g. ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED
//   socketClosedWithError                    the TLS socket's close event said it failed
//   timedOut       nothing ended within 10 s
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const http2 = require('http2');

const spec = JSON.parse(process.argv[2]);
const seen = {
  connected: false, serverSan: null, settings: false, status: null, greeting: null, echoLength: null,
  echoSha256: null, sentSha256: null, sessionError: null, streamError: null, socketError: null,
  socketClosedWithError: null, timedOut: false,
};
let reported = false;

function report() {
  if (reported) return;
  reported = true;
  console.log(JSON.stringify(seen));
  process.exit(0);
}

function errorCode(err) {
  return err.code || String(err);
}

const options = {
  ca: fs.readFileSync(spec.ca), minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3', ALPNProtocols: ['h2'],
  localAddress: spec.localAddress,
  checkServerIdentity: () => undefined,  // SPIFFE identities are URI SANs: reported, the test checks them
};
if (spec.cert) {
  options.cert = fs.readFileSync(spec.cert);
  options.key = fs.readFileSync(spec.key);
}
// An IP literal as host: Node sends no SNI, as HBONE requires.
const session = http2.connect(`https://${spec.host}:${spec.port}`, options);
setTimeout(() => { seen.timedOut = true; report(); }, 10000).unref();

session.on('connect', (_session, socket) => {
  seen.connected = true;
  const peer = socket.getPeerCertificate();
  seen.serverSan = (peer && peer.subjectaltname) || null;
  socket.on('error', (err) => { seen.socketError = errorCode(err); });
  socket.on('close', (hadError) => { seen.socketClosedWithError = hadError; });
});
session.on('remoteSettings', () => { seen.settings = true; });
session.on('error', (err) => { seen.sessionError = errorCode(err); });
session.on('close', report);

const head = { ':method': spec.method, ':authority': spec.authority };
if (spec.method !== 'CONNECT') head[':path'] = '/';
const req = session.request(head, { endStream: spec.method !== 'CONNECT' });
const chunks = [];
req.on('response', (headers) => {
  seen.status = headers[':status'];
  if (seen.status !== 200) return;
  const payload = Buffer.alloc(spec.payloadSize);
  for (let i = 0; i < payload.length; i++) payload[i] = i % 251;
  seen.sentSha256 = crypto.createHash('sha256').update(payload).digest('hex');
  req.end(payload);  // Node paces the write by the server's flow-control windows
});
req.on('data', (chunk) => chunks.push(chunk));
req.on('end', () => {
  if (seen.status !== 200) return;
  const received = Buffer.concat(chunks);
  const newline = received.indexOf(10);
  seen.greeting = received.subarray(0, newline < 0 ? received.length : newline).toString();
  const echo = newline < 0 ? Buffer.alloc(0) : received.subarray(newline + 1);
  seen.echoLength = echo.length;
  seen.echoSha256 = crypto.createHash('sha256').update(echo).digest('hex');
});
req.on('error', (err) => { seen.streamError = errorCode(err); });
req.on('close', () => session.close());
