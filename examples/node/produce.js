// Produces MAILBUS_COUNT (default 1) email.requested records for MAILBUS_ACCOUNT
// to MAILBUS_TO and prints one JSON line per record once the broker acked it.
'use strict'
const crypto = require('crypto')
const { Partitioners } = require('kafkajs')
const { load, kafka, prefix } = require('./contract')

async function main () {
  const requested = load('email.requested', 1)
  // DefaultPartitioner is murmur2 as Kafka's Java client computes it;
  // LegacyPartitioner (kafkajs 1.x's default) puts keys elsewhere.
  const producer = kafka().producer({ createPartitioner: Partitioners.DefaultPartitioner, idempotent: true })
  await producer.connect()
  try {
    const account = process.env.MAILBUS_ACCOUNT
    for (let i = 0; i < Number(process.env.MAILBUS_COUNT || 1); i++) {
      const now = Date.now() * 1000 // timestamp-micros
      const request = {
        event_id: crypto.randomUUID(),
        message_id: crypto.randomUUID(),
        occurred_at: now,
        account_id: account,
        to: [{ email: process.env.MAILBUS_TO, name: null }],
        subject: 'Hello from Node.js',
        text: 'Sent by the kafkajs example.',
        requested_at: now
      } // the other fields take their schema defaults
      const [ack] = await producer.send({
        topic: prefix + 'email.requested',
        acks: -1,
        messages: [{ key: account, value: requested.encode(request) }]
      })
      console.log(JSON.stringify({
        message_id: request.message_id, event_id: request.event_id,
        partition: ack.partition, offset: Number(ack.baseOffset)
      }))
    }
  } finally {
    await producer.disconnect()
  }
}

main().catch((err) => { console.error('produce:', err); process.exit(1) })
