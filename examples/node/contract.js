// What both Node examples need: the kafkajs connection from the environment
// and the mailbus single-object encoding (avsc has no CRC-64-AVRO fingerprint).
'use strict'
const fs = require('fs')
const path = require('path')
const avro = require('avsc')
const { Kafka, logLevel } = require('kafkajs')

// CRC-64-AVRO as the Avro specification gives it (schema fingerprints).
const EMPTY = 0xc15d213aa4d7a795n
const TABLE = Array.from({ length: 256 }, (_, i) => {
  let fp = BigInt(i)
  for (let j = 0; j < 8; j++) fp = (fp >> 1n) ^ (EMPTY & -(fp & 1n))
  return fp
})
function crc64avro (bytes) {
  let fp = EMPTY
  for (const b of bytes) fp = (fp >> 8n) ^ TABLE[Number((fp ^ BigInt(b)) & 0xffn)]
  return fp
}

// One version of a mailbus schema: encode() and decode() single-object records.
function load (topic, version) {
  const dir = process.env.MAILBUS_SCHEMAS || path.join(__dirname, '..', '..', 'schemas')
  const type = avro.Type.forSchema(JSON.parse(fs.readFileSync(path.join(dir, topic, `v${version}.avsc`))))
  // avsc's schema() is the Parsing Canonical Form (no doc, default or logicalType).
  const header = Buffer.alloc(10)
  header.writeUInt16BE(0xc301, 0)
  header.writeBigUInt64LE(crc64avro(Buffer.from(JSON.stringify(type.schema()))), 2)
  return {
    header,
    encode: (record) => Buffer.concat([header, type.toBuffer(record)]),
    decode (value) {
      if (value.length < 10 || !value.subarray(0, 10).equals(header)) {
        throw new Error(`not a ${topic} v${version} record (header ${value.subarray(0, 10).toString('hex')})`)
      }
      return type.fromBuffer(value.subarray(10))
    }
  }
}

function kafka () {
  const env = process.env
  const password = env.MAILBUS_PASSWORD_FILE
    ? fs.readFileSync(env.MAILBUS_PASSWORD_FILE, 'utf8').trim()
    : env.MAILBUS_PASSWORD
  const protocol = env.MAILBUS_SECURITY_PROTOCOL || 'SASL_PLAINTEXT'
  if (!['SASL_PLAINTEXT', 'SASL_SSL'].includes(protocol)) throw new Error(`MAILBUS_SECURITY_PROTOCOL ${protocol}`)
  const ssl = protocol === 'SASL_SSL' &&
    (env.MAILBUS_CA_FILE ? { ca: [fs.readFileSync(env.MAILBUS_CA_FILE, 'utf8')] } : true)
  return new Kafka({
    clientId: 'mailbus-example',
    brokers: (env.MAILBUS_BOOTSTRAP || '127.0.0.1:9092').split(','),
    ssl,
    sasl: { mechanism: 'scram-sha-512', username: env.MAILBUS_USERNAME, password },
    logLevel: logLevel.ERROR
  })
}

module.exports = { crc64avro, load, kafka, prefix: process.env.MAILBUS_TOPIC_PREFIX || '' }
