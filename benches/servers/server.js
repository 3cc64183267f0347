// The Node app of `baton-bench servers`: node:http on the socket baton
// hands over as fd 3 (LISTEN_FDS), with no dependencies. Readiness is
// baton's HTTP probe. On SIGTERM it stops accepting, closes idle
// keep-alive connections, lets the requests in flight finish, and exits.
'use strict';
const http = require('node:http');

if (process.env.LISTEN_PID !== String(process.pid) || process.env.LISTEN_FDS !== '1') {
  console.error('expected one socket from baton (LISTEN_FDS=1 for this pid)');
  process.exit(2);
}
const body = `hello from pid ${process.pid}, generation ${process.env.BATON_GENERATION || '?'}\n`;
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});
server.keepAliveTimeout = 5000;
server.listen({ fd: 3 });
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
