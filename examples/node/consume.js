// Reads email.confirmed from the beginning until it has a verdict for every
// message id given as an argument, printing each as a JSON line. Exits 1 if
// MAILBUS_TIMEOUT seconds (default 120) pass first. kafkajs always consumes
// in a group: MAILBUS_GROUP names it (the principal needs READ on it).
'use strict'
const crypto = require('crypto')
const { load, kafka, prefix } = require('./contract')

async function main () {
  const confirmed = load('email.confirmed', 1)
  const waiting = new Set(process.argv.slice(2))
  const seconds = Number(process.env.MAILBUS_TIMEOUT || 120)
  const groupId = process.env.MAILBUS_GROUP || `${prefix}mailbus-example-${crypto.randomUUID()}`
  const consumer = kafka().consumer({ groupId })
  await consumer.connect()
  await consumer.subscribe({ topic: prefix + 'email.confirmed', fromBeginning: true })
  let fail
  const done = new Promise((resolve, reject) => {
    fail = reject
    setTimeout(() => reject(new Error(`no verdict within ${seconds} s for ${waiting.size} message(s)`)), seconds * 1000).unref()
    consumer.run({
      eachMessage: async ({ topic, partition, message }) => {
        let verdict
        try {
          verdict = confirmed.decode(message.value)
        } catch (err) {
          return reject(new Error(`${topic}/${partition}/${message.offset}: ${err.message}`))
        }
        if (!waiting.delete(verdict.message_id)) return
        console.log(JSON.stringify({
          message_id: verdict.message_id, event_id: verdict.event_id, account_id: verdict.account_id,
          outcome: verdict.outcome, evidence: verdict.evidence,
          sent_to_delivered_us: verdict.sent_to_delivered_us
        }))
        if (waiting.size === 0) resolve()
      }
    }).catch((err) => fail(err))
  })
  try {
    if (waiting.size > 0) await done
  } finally {
    await consumer.disconnect()
  }
}

main().catch((err) => { console.error('consume:', err.message); process.exit(1) })
