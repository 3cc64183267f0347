// The Node app of `baton-bench servers` and `tools`: node:http with no
// dependencies. Under baton it serves the socket handed over as fd 3
// (LISTEN_FDS) and is probed over HTTP for readiness; under PM2 (cluster
// mode, `tools`) it listens on PORT itself. On SIGTERM (baton) or SIGINT
// (PM2's reload) it stops accepting, closes idle keep-alive connections,
// lets the requests in flight finish, and exits.
'use strict';
const http = require('node:http');

const body = `hello from pid ${process.pid}, generation ${process.env.BATON_GENERATION || '?'}\n`;
const server = http.createServer((req, res) => {
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
  for (const s of extra) s.close();
  server.close(() => process.exit(0));
  server.closeIdleConnections();
};
process.on('SIGTERM', drain);
process.on('SIGINT', drain);
