'use strict';
// amqplib against Warren: publish with confirms, consume with manual acks.
//
// Run by tests/python/test_amqplib.py, which starts a broker and passes its
// URL in WARREN_AMQP_URL:
//
//   WARREN_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f node --test tests/node/

const test = require('node:test');
const assert = require('node:assert/strict');
const amqp = require('amqplib');

const URL = process.env.WARREN_AMQP_URL;
const MESSAGES = 500;
const PREFETCH = 50;
// amqplib asks for frame_max 128 KiB, so a body this size travels as several
// body frames, from the publisher and again to the consumer.
const LARGE_BODY = 300 * 1024;

function bodyFor(i) {
  // Every 100th message is large; the rest are small and distinct.
  const padding = i % 100 === 99 ? 'x'.repeat(LARGE_BODY) : '';
  return `message ${i} ${padding}`;
}

// Rejects if `promise` has not settled within `ms`, naming what was awaited,
// so that a broker that stops answering fails the test with a reason.
function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Publishes, consumes and checks on `conn`; pushes channel errors to `errors`.
async function roundtrip(conn, errors) {
  const ch = await conn.createConfirmChannel();
  ch.on('error', (err) => errors.push(`channel: ${err.message}`));

  // A server-named, exclusive queue: nothing else can see or touch it.
  const { queue } = await ch.assertQueue('', { exclusive: true });
  assert.match(queue, /^amq\.gen-/);

  // ------------------------------------------------------------- publish
  // The callbacks only record what happened: an assertion thrown inside an
  // amqplib callback would not reach the test runner.
  const confirms = new Array(MESSAGES).fill('none');
  for (let i = 0; i < MESSAGES; i++) {
    const ok = ch.publish('', queue, Buffer.from(bodyFor(i)), { messageId: String(i) }, (err) => {
      confirms[i] = err ? 'nack' : 'ack';
    });
    if (!ok) {
      // The socket's buffer is full: wait for it to drain, as a publisher should.
      await within(30_000, 'drain', new Promise((resolve) => ch.once('drain', resolve)));
    }
  }
  await within(30_000, 'publisher confirms', ch.waitForConfirms());
  assert.deepEqual(
    confirms.flatMap((c, i) => (c === 'ack' ? [] : [`${i}: ${c}`])),
    [],
    'messages not acked by the broker',
  );

  // Every confirmed message is in the queue before anyone consumes.
  const declared = await ch.checkQueue(queue);
  assert.equal(declared.messageCount, MESSAGES);
  assert.equal(declared.consumerCount, 0);

  // ------------------------------------------------------------- consume
  await ch.prefetch(PREFETCH);
  const received = [];
  let cancelledByBroker = false;
  let stop;
  const done = new Promise((resolve) => { stop = resolve; });
  const { consumerTag } = await ch.consume(queue, (msg) => {
    if (msg === null) {
      cancelledByBroker = true;
      stop();
      return;
    }
    received.push({
      id: msg.properties.messageId,
      body: msg.content.toString(),
      redelivered: msg.fields.redelivered,
    });
    ch.ack(msg);
    if (received.length === MESSAGES) stop();
  }, { noAck: false });
  await within(60_000, `${MESSAGES} deliveries`, done).catch((err) => {
    throw new Error(`${err.message} (got ${received.length})`);
  });
  assert.equal(cancelledByBroker, false, 'the broker cancelled the consumer');
  await ch.cancel(consumerTag);

  // Exactly once and in publish order: compare the whole sequence, so that a
  // duplicate, a gap or a reordering all show up in the diff.
  assert.equal(received.length, MESSAGES, 'deliveries after the last expected one');
  for (let i = 0; i < MESSAGES; i++) {
    assert.equal(received[i].id, String(i), `delivery ${i} carried message ${received[i].id}`);
    assert.equal(received[i].body, bodyFor(i), `body of message ${i}`);
    assert.equal(received[i].redelivered, false, `message ${i} flagged redelivered`);
  }

  // Closing the channel would requeue anything left unacked; the queue being
  // empty afterwards shows that Warren took every ack.
  await ch.close();
  const check = await conn.createChannel();
  check.on('error', (err) => errors.push(`check channel: ${err.message}`));
  const after = await check.checkQueue(queue);
  assert.equal(after.messageCount, 0, 'messages left after acking all of them');
  assert.equal(after.consumerCount, 0);
  const deleted = await check.deleteQueue(queue);
  assert.equal(deleted.messageCount, 0);
  await check.close();
}

test('confirmed publishes are consumed exactly once, in order', { timeout: 120_000 }, async () => {
  assert.ok(URL, 'WARREN_AMQP_URL must be set to the broker URL');

  const conn = await amqp.connect(URL);
  // Any connection or channel error must fail the test, not just be logged.
  const errors = [];
  conn.on('error', (err) => errors.push(`connection: ${err.message}`));
  let closed = false;
  let closedCleanly = false;
  const connClosed = new Promise((resolve) => conn.on('close', (err) => {
    closed = true;
    closedCleanly = err === undefined;
    resolve();
  }));

  try {
    await roundtrip(conn, errors);
    await conn.close();
    await within(10_000, 'connection close', connClosed);
    assert.ok(closedCleanly, 'connection closed with an error');
    assert.deepEqual(errors, []);
  } finally {
    // After a failure too: an open socket would keep the test process alive.
    if (!closed) {
      await within(5_000, 'connection close after a failure', conn.close()).catch(() => {});
    }
  }
});
