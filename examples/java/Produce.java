// Produces MAILBUS_COUNT (default 1) email.requested records for MAILBUS_ACCOUNT
// to MAILBUS_TO and prints one JSON line per record once the broker acked it.
// Build and run: see ../README.md
import java.nio.ByteBuffer;
import java.time.Instant;
import java.time.temporal.ChronoUnit;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.generic.GenericRecordBuilder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class Produce {
    public static void main(String[] args) throws Exception {
        Schema schema = Connection.schema("email.requested", 1);
        Schema address = schema.getField("to").schema().getElementType();
        // Writes C3 01, the CRC-64-AVRO fingerprint of the Parsing Canonical Form, then the body.
        var encoder = new BinaryMessageEncoder<GenericRecord>(GenericData.get(), schema);
        Properties props = Connection.properties();
        // The Java client's default partitioner is the murmur2 one mailbus uses: nothing to set.
        props.put("acks", "all");
        props.put("enable.idempotence", "true");
        String topic = Connection.env("MAILBUS_TOPIC_PREFIX", "") + "email.requested";
        String account = System.getenv("MAILBUS_ACCOUNT");
        int count = Integer.parseInt(Connection.env("MAILBUS_COUNT", "1"));
        try (var producer = new KafkaProducer<>(props, new StringSerializer(), new ByteArraySerializer())) {
            for (int i = 0; i < count; i++) {
                long now = ChronoUnit.MICROS.between(Instant.EPOCH, Instant.now()); // timestamp-micros
                String messageId = UUID.randomUUID().toString(), eventId = UUID.randomUUID().toString();
                GenericRecord request = new GenericRecordBuilder(schema) // unset fields take their defaults
                    .set("event_id", eventId)
                    .set("message_id", messageId)
                    .set("occurred_at", now)
                    .set("account_id", account)
                    .set("to", List.of(new GenericRecordBuilder(address).set("email", System.getenv("MAILBUS_TO")).build()))
                    .set("subject", "Hello from Java")
                    .set("text", "Sent by the kafka-clients example.")
                    .set("requested_at", now)
                    .build();
                ByteBuffer value = encoder.encode(request);
                byte[] bytes = new byte[value.remaining()];
                value.get(bytes);
                RecordMetadata ack = producer.send(new ProducerRecord<>(topic, account, bytes)).get();
                System.out.printf("{\"message_id\": \"%s\", \"event_id\": \"%s\", \"partition\": %d, \"offset\": %d}%n",
                    messageId, eventId, ack.partition(), ack.offset());
            }
        }
    }
}
