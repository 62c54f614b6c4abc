// Preloaded into Node.js suites (NODE_OPTIONS=--require ...) whose tests
// connect to the default AMQP port 5672 directly: such connections go to
// $AMQP_PORT instead, so no test file needs editing.
const net = require('node:net');

const target = Number(process.env.AMQP_PORT || 5672);
if (target !== 5672) {
  for (const name of ['connect', 'createConnection']) {
    const original = net[name];
    net[name] = function (...args) {
      if (args[0] && typeof args[0] === 'object' && Number(args[0].port) === 5672) {
        args[0] = Object.assign({}, args[0], { port: target });
      } else if ((typeof args[0] === 'number' || typeof args[0] === 'string') && Number(args[0]) === 5672) {
        args[0] = target;
      }
      return original.apply(this, args);
    };
  }
}
