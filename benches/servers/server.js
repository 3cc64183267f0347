// The Node app of `baton-bench servers` and `tools`: node:http with no
// dependencies. Under baton it serves the socket handed over as fd 3
// (LISTEN_FDS) and is probed over HTTP for readiness; under PM2 (cluster
// mode, `tools`) it listens on PORT itself. On SIGTERM (baton) or SIGINT
// (PM2's reload) it drains with the keep-alive pattern of docs/protocol.md:
// it stops accepting, answers what still comes on open connections with
// `Connection: close`, closes the connections still idle after a grace of
// IDLE_GRACE_MS, and exits once every connection is closed.
'use strict';
const http = require('node:http');

const IDLE_GRACE_MS = 500;
const body = `hello from pid ${process.pid}, generation ${process.env.BATON_GENERATION || '?'}\n`;
let draining = false;
const server = http.createServer((req, res) => {
  if (draining) res.setHeader('connection', 'close'); // node closes it after this answer
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});
server.keepAliveTimeout = 5000;
const extra = [];
if (process.env.LISTEN_FDS !== undefined) {
  const n = Number(process.env.LISTEN_FDS);
  if (process.env.LISTEN_PID !== String(process.pid) || !(n >= 1)) {
    console.error('expected sockets from baton (LISTEN_FDS for this pid)');
    process.exit(2);
  }
  // Every socket handed over: fd 3 is the listener; with shared sockets
  // and an HTTP readiness check, baton adds its probe's (LISTEN_FDNAMES).
  for (let fd = 3; fd < 3 + n; fd++) {
    const s = fd === 3 ? server : http.createServer(server.listeners('request')[0]);
    s.listen({ fd });
    if (fd !== 3) extra.push(s);
  }
} else if (process.env.PORT) {
  server.listen(Number(process.env.PORT), '127.0.0.1', () => {
    if (process.send) process.send('ready'); // PM2's wait_ready
  });
} else {
  console.error('neither LISTEN_FDS (baton) nor PORT (PM2) is set');
  process.exit(2);
}
const drain = () => {
  if (draining) return;
  draining = true;
  for (const s of extra) s.close();
  // close() closes idle connections at once (Node >= 19): keep it from
  // doing so, and close what is still idle once the grace is over.
  const closeIdle = server.closeIdleConnections.bind(server);
  server.closeIdleConnections = () => {};
  server.close(() => process.exit(0));
  setTimeout(closeIdle, IDLE_GRACE_MS).unref();
};
process.on('SIGTERM', drain);
process.on('SIGINT', drain);
