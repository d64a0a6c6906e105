// Reads email.confirmed from the beginning until it has a verdict for every
// message id given as an argument, printing each as a JSON line. Exits 1 if
// MAILBUS_TIMEOUT seconds (default 120) pass first. It joins no consumer
// group (assign, not subscribe), so the principal needs only READ on the topic.
// Build and run: see ../README.md
import java.nio.ByteBuffer;
import java.time.Duration;
import java.time.Instant;
import java.util.HashSet;
import java.util.Properties;
import java.util.Set;
import java.util.stream.Collectors;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.StringDeserializer;

public class Consume {
    public static void main(String[] args) throws Exception {
        Schema schema = Connection.schema("email.confirmed", 1);
        // Checks the marker and the writer's fingerprint; add older versions with addSchema().
        var decoder = new BinaryMessageDecoder<GenericRecord>(GenericData.get(), schema);
        Properties props = Connection.properties();
        props.put("enable.auto.commit", "false");
        String topic = Connection.env("MAILBUS_TOPIC_PREFIX", "") + "email.confirmed";
        Set<String> waiting = new HashSet<>(Set.of(args));
        Instant deadline = Instant.now().plusSeconds(Long.parseLong(Connection.env("MAILBUS_TIMEOUT", "120")));
        try (var consumer = new KafkaConsumer<>(props, new StringDeserializer(), new ByteArrayDeserializer())) {
            var partitions = consumer.partitionsFor(topic).stream()
                .map(p -> new TopicPartition(topic, p.partition())).collect(Collectors.toList());
            consumer.assign(partitions);
            consumer.seekToBeginning(partitions);
            while (!waiting.isEmpty()) {
                if (Instant.now().isAfter(deadline)) {
                    System.err.printf("consume: no verdict in time for %d message(s)%n", waiting.size());
                    System.exit(1);
                }
                for (ConsumerRecord<String, byte[]> record : consumer.poll(Duration.ofMillis(500))) {
                    GenericRecord verdict = decoder.decode(ByteBuffer.wrap(record.value()));
                    String messageId = verdict.get("message_id").toString();
                    if (!waiting.remove(messageId)) {
                        continue;
                    }
                    System.out.printf("{\"message_id\": \"%s\", \"event_id\": \"%s\", \"account_id\": \"%s\", "
                        + "\"outcome\": \"%s\", \"evidence\": \"%s\", \"sent_to_delivered_us\": %s}%n",
                        messageId, verdict.get("event_id"), verdict.get("account_id"), verdict.get("outcome"),
                        verdict.get("evidence"), verdict.get("sent_to_delivered_us"));
                }
            }
        }
    }
}
